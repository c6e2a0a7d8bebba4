"""The seeded initial weights w0: Philox streams, the init scheme and its compiled kernel.

Imports nothing else of dropfleet: every machine regenerates w0 from it bit for bit.
"""
