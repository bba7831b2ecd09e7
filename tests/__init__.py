"""The test suite. Imported before any test module or conftest, so the environment set here
holds for every test process and the party nodes they start.

gRPC's fork handlers are off (``GRPC_ENABLE_FORK_SUPPORT``, read when gRPC's core library
loads, hence here): pyspark starts its JVM through Popen's ``preexec_fn``, a fork() whose
child gRPC's handler can abort before exec ("epoll_wait error: Bad file descriptor") once
gRPC runs in the process. A party node starts Spark before its server; a test process may
start it after other tests ran servers.
"""

import os
import sys

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# under pytest this package is imported before any test module; a benchmark that imports a
# test helper after mpcdp has no fork handlers to turn off that matter to it
if "pytest" in sys.modules and "grpc" in sys.modules:
    raise RuntimeError("tests/__init__.py must run before gRPC is imported")
