"""A tiny Qwen2 model and byte-level BPE tokenizer, built in-process: tests never download anything.

The tokenizer uses Qwen2's pre-tokenizer regex, because AutoTokenizer re-applies it when it reloads a
`model_type: qwen2` folder (see ENVIRONMENT.md); a plain ByteLevel tokenizer would change ids on reload.
"""
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "What is 1 + 1? The answer is \\boxed{2}. Let x = 3, then 2x + 1 = 7 and x^2 = 9.",
    "Compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. So the final answer is \\boxed{\\frac{5}{6}}.",
    "The interval is [0, 1) and the set is \\{1, 2, 3\\}. Therefore the answer is (A).",
    "First, we note that the triangle has sides 3, 4 and 5, so its area is 6.",
    "user assistant system 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def make_tokenizer(vocab_size: int = 384, corpus=CORPUS) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def make_model(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               tie: bool = False, seed: int = 0) -> Qwen2ForCausalLM:
    """hidden 128 / 4 heads gives head_dim 32, the smallest vLLM's CPU attention accepts."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=tie,
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(config).eval()


def save_tiny(path, tie: bool = False, seed: int = 0) -> Path:
    """Write a loadable model folder (weights, config, tokenizer, generation config) and return it."""
    tokenizer = make_tokenizer()
    return save_model(path, tokenizer, make_model(tokenizer, tie=tie, seed=seed))


def save_model(path, tokenizer, model) -> Path:
    """The model and its tokenizer as one folder transformers and vLLM load; generation stops at eos."""
    path = Path(path)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
