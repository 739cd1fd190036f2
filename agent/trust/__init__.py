"""Trust: what the device believes, and why. Pure verification, bytes in, verdict out.

    signatures   Ed25519 keys, signature files, threshold checks over canonical JSON
    root         root.json: keys and roles with thresholds; rotation by chained signatures
    manifest     the bundle manifest (the bundle contract: files, tensors, reference stats)
    verify       a bundle's manifest and file set against the root, the device and the clock
    bundle       a bundle directory on disk: capped reads, file hashes
    archive      a bundle archive (.tar.zst / .tar.gz), unpacked only as the manifest says
    command      signed operator commands: addressee, expiry, replay window
    nonces       seen command nonces (SQLite), so a replay after a reboot is refused too
    sealing      at-rest protection: model files sealed to the device's X25519 key

Nothing here reads the clock or the network: callers pass `now`, bytes and paths. Every
refusal is one `agent.errors.RejectedError` subclass with a stable `check` name.
See docs/architecture.md, "Trust".
"""
