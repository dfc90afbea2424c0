"""The byte tokenizer of byte models: text <-> UTF-8 bytes, 256 ids, nothing unknown."""
import numpy as onp

DECODE_NOTE = ("bytes are decoded as UTF-8 with errors='replace': a byte sequence that is not valid UTF-8 "
               "shows as U+FFFD (\ufffd) instead of failing")


class ByteTokenizer:
    """Text <-> UTF-8 bytes. 256 ids, no unknown characters, and `decode` never fails."""
    vocab_size = 256

    def encode(self, text):
        """str -> list of byte values 0..255."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(f"text holds a lone surrogate {text[e.start]!r} at {e.start}, which UTF-8 cannot "
                             f"encode; only real characters can be encoded") from None

    def encode_array(self, text):
        """str -> (n_bytes,) int32."""
        return onp.asarray(self.encode(text), dtype=onp.int32)

    def decode(self, ids):
        """Byte values -> str; invalid UTF-8 becomes U+FFFD (errors='replace'), so this never fails."""
        ids = [int(i) for i in onp.asarray(ids, dtype=onp.int64).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte ids must be in 0..255, got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")

    def hash(self):
        """What a checkpoint records to know its tokenizer: there is only one byte tokenizer."""
        return "bytes"
