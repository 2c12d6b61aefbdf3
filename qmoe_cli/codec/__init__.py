"""Sub-1-bit entropy coding of expert codes: the fitted dictionary code for ternary (`dictionary`,
`rows`), bit-packing for b-bit (`bitpack`), and the optional C++ codec (`native`, sources in the
top-level `kernels/`). Imports only `errors` and `resources`.
"""
