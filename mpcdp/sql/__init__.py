"""DP SQL across organisations: the typed plan (plan), the compiler (compile) and the
renderer into each engine's SQL (render). Pure: no I/O, no data."""
