"""Updates: a verified bundle from the network to the active slot, and back on failure.

    lifecycle    the update state machine, its transitions as one table of data
    store        installed bundles, `active`/`previous` slots and the journal on disk
    install      the one install sequence (stage, load, self-test, activate, commit) that
                 the daemon and the fleet simulator's stand-in share
    fetch        downloads with resume, size pin, timeout and minimum rate
    deploy       the pure deploy flow of a fleet deploy: download, install, health window,
                 commit, cancel by a rollback command

See docs/architecture.md, "Lifecycle".
"""
