"""The operator's keys and what they sign: releases, commands, roots, heartbeats.

    keys         the key directory: root, release and command keys, root.json rotation
    pki          the CA and certificates of the broker's mutual TLS
    release      bundles signed, sealed to devices, packed, verified as a device would
    commands     signed deploy, rollback, restart, reload and config commands
    artifacts    the HTTP server (with Range) devices download archives from
    publish      retained root announcements and the signed freshness heartbeat

See docs/architecture.md, "The fleet".
"""
