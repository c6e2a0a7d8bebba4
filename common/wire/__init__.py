"""What travels: the protobuf codec, the uplink and the downlink (and top-k's dense catch-up).

Builds on model/ and seed/.
"""
