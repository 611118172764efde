"""Write embedkit_paraphrase_onnx/reference.npz: the ONNX file's own outputs, by onnxruntime alone.

Run once by the plugin's author (``python make_reference.py``); embedkit's gate and
``check_backbone`` compare the stored backbone with these numbers.
"""
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from embedkit_paraphrase_onnx import OUTPUT, REFERENCE, onnx_path, tokenizer_path

TEXTS = [
    "I still have not received my card",
    "What is the exchange rate?",
    "How do I top up my account with a cheque?",
    "a",
    "The quick brown fox jumps over the lazy dog while the careful reader checks every number twice.",
    "Why was my transfer declined, and when will the money be back in my account?",
    "ok",
    "Paraphrase models map sentences with the same meaning to nearby vectors.",
]


def main() -> None:
    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.no_padding()
    tok.enable_truncation(128)
    session = ort.InferenceSession(str(onnx_path()), providers=["CPUExecutionProvider"])
    rows = []
    for text in TEXTS:  # one at a time: no padding at all
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        rows.append(session.run([OUTPUT], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0])
    np.savez(REFERENCE, texts=np.array(TEXTS), embeddings=np.stack(rows).astype(np.float32))


if __name__ == "__main__":
    main()
