"""One-run privacy audit (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1)
training run", NeurIPS): the bound (:mod:`mpcdp.audit.bound`) and the public canaries with
their scores (:mod:`mpcdp.audit.canaries`). numpy only; nothing runs at import time."""
