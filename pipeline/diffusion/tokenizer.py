"""A tiny CLIP BPE tokenizer whose vocab and merges the project writes itself (no Hub download).

Byte-level symbols cover any text; whole-word merges exist only for the domain words below, so
rare instance tokens such as "sks" split into pieces exactly as they do in a real CLIP vocab.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.params import CLASS_NAMES

DOMAIN_WORDS = sorted(
    {"a", "an", "of", "the", "photo", "dermoscopic", "image", "skin", "lesion", "close", "up"}
    | {word for name in CLASS_NAMES.values() for word in name.split()}
    | set(CLASS_NAMES)
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_vocab_and_merges(words: list[str] = DOMAIN_WORDS) -> tuple[dict[str, int], list[str]]:
    symbols = list(_bytes_to_unicode().values())
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            rule, merged = f"{current} {nxt}", current + nxt
            if rule not in merges:
                merges.append(rule)
            if merged not in vocab:
                vocab.append(merged)
            current = merged
    vocab += [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}, merges


def write_tokenizer(folder: str | Path, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the configs CLIPTokenizer.from_pretrained expects."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
