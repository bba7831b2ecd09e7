"""The round protocol, transport-agnostic (docs/design.md, "Round protocol").

- ``identity``: signing and verifying ephemeral keys with the parties' certificates (shared).
- ``noise_pool``: noisy local vectors built ahead of time, off the request path (shared).
- ``session``: the session core both engines share: the party's identity (PartyIdentity),
  key signing, session slots, registration, closed sessions and the time to live
  (SessionHost), what a session hands the transport (Proposal, Contribution).
- ``query``: one query round: the spec and its digest (query_spec), what it releases
  (plan), a party's local statistic (local_statistic), the party's query engine
  (party_engine), the coordinator's round (round_coordinator).
- ``training``: federated DP-SGD over one session: the TrainSpec (train_spec), the site's
  engine (site_engine), the coordinator's session (training_session); it builds on the
  shared ``session`` core, not on ``query``'s engine.

No module here imports grpc or protobuf; mpcdp.transport maps these onto the wire.
"""
