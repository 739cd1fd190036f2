from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter.data import load_dataset, order_inputs, split
from converter.errors import DataError, RecipeError
from converter.recipe import Recipe, load_recipe, option_names


def _npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return str(path)


def test_digits_loads_as_images_in_unit_range() -> None:
    ds = load_dataset("digits")
    assert ds.x.shape == (1797, 1, 8, 8)
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.y is not None and set(np.unique(ds.y)) == set(range(10))


def test_split_is_deterministic_disjoint_and_stratified() -> None:
    y = np.repeat(np.arange(10), 50)
    a = split(500, y, seed=3, val_fraction=0.15, test_fraction=0.2)
    b = split(500, y, seed=3, val_fraction=0.15, test_fraction=0.2)
    assert all(np.array_equal(u, v) for u, v in zip(
        (a.train, a.val, a.test), (b.train, b.val, b.test), strict=True))
    union = np.concatenate([a.train, a.val, a.test])
    assert len(union) == len(set(union.tolist())) == 500
    assert set(np.bincount(y[a.test])) == {10}


@pytest.mark.parametrize(("arrays", "message"), [
    ({"y": np.zeros(60, dtype=np.int64)}, "no array 'x'"),
    ({"x": np.full((60, 4), np.nan, dtype=np.float32)}, "NaN/inf"),
    ({"x": np.ones((10, 4), dtype=np.float32)}, "at least 50"),
    ({"x": np.ones((60, 4), dtype=np.float32), "y": np.zeros(59, dtype=np.int64)}, "y must be"),
    ({"x": np.ones((60, 4), dtype=np.float32), "y": np.full(60, 0.5)}, "y must be"),
    ({"x": np.array(["a"] * 60).reshape(60, 1)}, "numeric"),
    ({"u": np.ones((60, 3)), "v": np.ones((59, 2))},
     r"different numbers of samples \(u 60, v 59\)"),
    ({"u": np.ones((60, 3)), "v": np.ones(60)}, "input v must be numeric with shape"),
    ({"u": np.ones((60, 3)), "y": np.zeros(60, dtype=np.int64)},
     "no array 'x'.*several inputs takes one array per input name"),
])
def test_bad_data_is_named(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(_npz(tmp_path, **arrays))


def test_several_inputs_stand_side_by_side_in_the_models_order(tmp_path: Path) -> None:
    """One array per input name: each sample's values side by side, in the file's order,
    and in the model's order once it is known (`order_inputs`)."""
    rng = np.random.default_rng(0)
    v, u = rng.normal(size=(60, 2, 2)), rng.normal(size=(60, 3))
    ds = load_dataset(_npz(tmp_path, v=v, u=u, y=np.arange(60) % 2))
    assert ds.inputs == [("v", (2, 2)), ("u", (3,))] and ds.x.shape == (60, 7)
    ordered = order_inputs(ds, ["u", "v"])
    assert ordered.inputs == [("u", (3,)), ("v", (2, 2))]
    np.testing.assert_allclose(ordered.x[:, :3], u.astype(np.float32))
    np.testing.assert_allclose(ordered.x[:, 3:].reshape(60, 2, 2), v.astype(np.float32))
    with pytest.raises(DataError, match="holds inputs v, u; the model takes u, w"):
        order_inputs(ds, ["u", "w"])


def test_a_corrupt_or_missing_data_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_dataset(str(bad))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_recipe_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[distill]\nepochs = 3\nepohcs = 4\n")
    with pytest.raises(RecipeError, match=r"distill.epohcs: Extra inputs"):
        load_recipe(path, {})


def test_command_line_overrides_the_file_and_paths_resolve_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('out = "o"\n[data]\nsource = "d.npz"\n[distill]\nepochs = 3\nlr = 0.5\n')
    recipe = load_recipe(path, {("distill", "epochs"): 9})
    assert recipe.distill.epochs == 9 and recipe.distill.lr == 0.5
    assert recipe.data.source == str(tmp_path / "d.npz")
    assert recipe.out == str(tmp_path / "o")


def test_every_recipe_field_has_a_command_line_option() -> None:
    names = option_names()
    fields = {(s, f) for s, info in Recipe.model_fields.items() if s != "out"
              for f in info.annotation.model_fields}  # type: ignore[union-attr]
    assert fields | {(None, "out")} == set(names.values())


@pytest.mark.parametrize("shape", [(64,), (1, 128), (3, 40), (1, 8, 8), (3, 12, 20), (2, 5, 33)])
@pytest.mark.parametrize("family", ["auto", "mlp", "cnn", "dscnn"])
def test_every_family_takes_every_shape_it_claims_and_folds_exactly(
        family: str, shape: tuple[int, ...]) -> None:
    """Vectors (mlp), sequences and images of any H x W (cnn, dscnn; 1-D or 2-D by rank);
    batch norm folds into Conv1d and Conv2d without changing the outputs."""
    import torch

    from converter.errors import RecipeError
    from converter.recipe import StudentOptions
    from converter.students import build_student, fold_batchnorm

    opts = StudentOptions(family=family)  # type: ignore[arg-type]
    if family in ("cnn", "dscnn") and len(shape) == 1:
        with pytest.raises(RecipeError, match=r"sequences \(C, L\) or images"):
            build_student(opts, shape, 5)
        return
    model = build_student(opts, shape, 5)
    x = torch.randn(4, *shape)
    model.train()
    model(torch.randn(16, *shape))  # batch-norm statistics away from their defaults
    model.eval()
    with torch.no_grad():
        want = model(x)
        got = fold_batchnorm(model)(x)
    assert want.shape == (4, 5)
    assert not any(isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)
                   for m in fold_batchnorm(model).modules())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
