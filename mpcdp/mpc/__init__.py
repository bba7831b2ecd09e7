"""The MPC core: Z_2^64 ring arithmetic, fixed-point encoding and randomized rounding, key
agreement and AES-CTR streams, additive sharing and pairwise masks, the CSPRNG. Pure: no I/O,
no grpc, no torch; imports only mpcdp.errors and mpcdp's version constants.
"""
