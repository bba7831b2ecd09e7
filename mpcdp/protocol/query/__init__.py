"""One query round (propose -> contribute -> reveal): the spec an analyst asks and its digest,
the release plan, a party's local statistic and session state machine, the coordinator's
round. Its session machinery (slots, closed sessions, pair keys) is reused by
mpcdp.protocol.training.
"""
