"""File formats: each encodes one batch into the bytes of one file. Knows no storage and no sink."""
