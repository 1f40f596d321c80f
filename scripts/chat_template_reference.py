"""Reference renders for the chat-template parity test: transformers'
`apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`
on a given template with given special tokens.

Reads JSON from stdin:
  {"cases": [{"template": "<path>", "special_tokens": {"bos_token": "<s>", ...},
              "messages": [{"role": ..., "content": ...}, ...]}, ...]}
Writes JSON to stdout: {"results": [{"rendered": "..."} or {"error": "..."}, ...]},
one per case, in order. An error is what the template raised.
"""

import json
import sys

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast


def tokenizer(special_tokens):
    # The template only sees the special-token strings; the vocabulary is
    # irrelevant to rendering with tokenize=False.
    backend = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def main():
    request = json.load(sys.stdin)
    templates = {}
    results = []
    for case in request["cases"]:
        path = case["template"]
        if path not in templates:
            with open(path, encoding="utf-8") as f:
                templates[path] = f.read()
        tok = tokenizer(case.get("special_tokens", {}))
        try:
            rendered = tok.apply_chat_template(
                case["messages"],
                chat_template=templates[path],
                add_generation_prompt=True,
                tokenize=False,
            )
            results.append({"rendered": rendered})
        except Exception as e:  # noqa: BLE001 - the template's own error
            results.append({"error": f"{type(e).__name__}: {e}"})
    json.dump({"results": results}, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
