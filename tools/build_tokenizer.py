"""Build the tiny character-level tokenizer shipped in ``dpo_dist/assets/tokenizer``.

Deterministic and offline: every printable ASCII character plus tab and newline is one token,
anything else is ``<unk>``. Ids: ``<unk>`` 0, ``<s>`` 1 (BOS, added when encoding with special
tokens), ``</s>`` 2 (EOS, never added automatically), ``<pad>`` 3, then tab, newline and
``' '`` .. ``'~'`` (101 tokens in all). Decoding concatenates tokens, so text round-trips exactly.

The chat template writes plain characters, starts with the BOS text, and closes assistant turns
with the EOS text::

    <s><|system|>\\nBe brief.\\n<|user|>\\nHi\\n<|assistant|>\\nHello!</s>

``add_generation_prompt`` appends ``<|assistant|>\\n``. Roles other than system, user and
assistant are an error.

Usage: ``python tools/build_tokenizer.py [--output DIR]`` (default: the bundled asset folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
CHARACTERS = ["\t", "\n"] + [chr(code) for code in range(0x20, 0x7F)]
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "dpo_dist" / "assets" / "tokenizer"

CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('unknown chat role: ' + message['role']) -}}
    {%- endif -%}
    {{- '<|' + message['role'] + '|>\\n' + message['content'] -}}
    {%- if message['role'] == 'assistant' -%}
        {{- eos_token -}}
    {%- else -%}
        {{- '\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\\n' -}}
{%- endif -%}
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer, in memory."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: index for index, token in enumerate(specials + CHARACTERS)}
    # BPE with no merges and no pre-tokenizer splits text into single characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    core.add_special_tokens(specials)
    core.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save(output: Path) -> None:
    """Write the tokenizer files to ``output``."""
    build_tokenizer().save_pretrained(output)
    # transformers 5 records its internal class name; the public alias loads on 4.x and 5.x alike.
    config_path = output / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder to write into")
    save(parser.parse_args().output)


if __name__ == "__main__":
    main()
