"""The fleet's record: one interface, two engines (SQLite, PostgreSQL).

    engine       `Store`: one connection, one lock, transactions, the dialect's few
                 differences; `open_store(path or postgresql:// URL)`
    schema       numbered migrations for both engines (`migrate`)

See docs/architecture.md, "The fleet".
"""
