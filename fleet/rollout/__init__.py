"""Staged rollouts.

    policy       the pure core: execution and rollout tables, the wave verdict, retries,
                 pace, wave sizes
    rows         the record's rows as read (`Rollout`, `RolloutDevice`, history)
    record       `Rollouts`: the execution record, every change through the tables
    lease        which controller drives a rollout: database-timed, fenced
    sending      signed commands recorded, published, acknowledged
    results      devices' results and deploy events applied to the record
    controller   `Controller`: a rollout stepped from its record
    status       the rollout's status lines
    recover      one-off signed rollback/restart/reload to a group or device

See docs/architecture.md, "The fleet".
"""
