"""A tiny Llama GGUF for model-level tests: 2 layers, hidden 64, 4/2 heads of 16, MLP 128, a
byte-level (GPT-2 style) vocabulary of the 256 byte tokens, a few merges and <|endoftext|>, and
a chat template. Random weights with a fixed seed; the LM head only scores ASCII letters and
the space, so greedy text is printable and never ends early (the end token scores 0)."""
import gguf
import numpy as np

D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 2, 4, 2, 16, 128
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_alphabet():
    """GPT-2's printable spelling of the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def vocabulary():
    """(tokens, token types): <|endoftext|>, <|im_start|>, <|im_end|>, 256 bytes, the merges."""
    alphabet = _byte_alphabet()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [alphabet[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in MERGES]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types


def write_tiny_gguf(path, context=16384, seed=0, tied=False, experts=0):
    """Writes the tiny model to `path` (float32 weights) and returns the vocabulary size.
    tied: no output.weight (the LM head is the embedding); experts > 0: Mixtral-style MoE
    layers with that many experts, two per token."""
    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(context)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)

    def mat(n, k, scale=0.2):
        return (rng.standard_normal((n, k)) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(V, D, 1.0))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    head = mat(V, D, 1.0)
    printable = np.zeros(V, bool)
    for i, t in enumerate(tokens):
        printable[i] = i >= 3 and (t.isascii() and t.isalpha() or t == "Ġ")
    head[~printable] = 0
    if not tied:
        w.add_tensor("output.weight", head)
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
        w.add_tensor(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
        w.add_tensor(p + "attn_q.weight", mat(HEADS * HEAD_DIM, D))
        w.add_tensor(p + "attn_k.weight", mat(KV_HEADS * HEAD_DIM, D))
        w.add_tensor(p + "attn_v.weight", mat(KV_HEADS * HEAD_DIM, D))
        w.add_tensor(p + "attn_output.weight", mat(D, HEADS * HEAD_DIM))
        if experts:
            w.add_tensor(p + "ffn_gate_inp.weight", mat(experts, D))
            w.add_tensor(p + "ffn_gate_exps.weight", np.stack([mat(FFN, D) for _ in range(experts)]))
            w.add_tensor(p + "ffn_up_exps.weight", np.stack([mat(FFN, D) for _ in range(experts)]))
            w.add_tensor(p + "ffn_down_exps.weight", np.stack([mat(D, FFN) for _ in range(experts)]))
        else:
            w.add_tensor(p + "ffn_gate.weight", mat(FFN, D))
            w.add_tensor(p + "ffn_up.weight", mat(FFN, D))
            w.add_tensor(p + "ffn_down.weight", mat(D, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return V
