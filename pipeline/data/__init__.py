"""Data in: a corpus becomes a manifest of usable segments (the `prepare` stage).

    prepare      raw MMSA layout (label.csv + Raw/<video>/<clip>.mp4) -> manifest + rejects, split guard
    mmsa         MMSA / MulT feature pickles as a source (ids, lengths, non-finite values)
    safe_pickle  pickles read without running code in them, arrays kept out of memory
    media        PyAV probing and decoding (no ffmpeg binary)
    export       our features written back as an MMSA pickle

Imports only the top-level helpers (params, errors, schema, presets, progress).
"""
