"""``lrpretrain export run.dir=PATH out=DIR``: a trained run as a Hugging Face ``LlamaForCausalLM``.

The directory holds what ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` read, offline and without remote code:

- ``config.json``: ``LlamaForCausalLM`` with the run's shapes, ``rms_norm_eps``, ``rope_theta``,
  ``tie_word_embeddings``, ``torch_dtype`` and the special token ids;
- ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` when the weights pass ``max_shard_bytes`` (5 GB, HF's default);
- ``generation_config.json``: the special ids and ``lrpretrain generate``'s defaults (sampling at
  temperature 0.8, top-k 50);
- ``tokenizer.json`` (the run's tokenizer, saved by ``tokenizers``), ``tokenizer_config.json`` and
  ``special_tokens_map.json``: EOS and pad as the run's ``data.eos_token`` / ``data.pad_token``.

The weights are the method's dense function (:meth:`~lrpretrain.methods.Method.dense_weights`: LoRA,
ReLoRA, SLTrain, ... merged into plain ``nn.Linear`` weights). Our LLaMA is laid out as HF's: the
rotary embedding is the rotate-half form HF uses (no q/k permutation, unlike Meta's interleaved
checkpoints), RMSNorm computes in fp32 and scales after casting back, as HF's does; only the names
change (:func:`hf_name`).

Choices where the issue left them open:
- ``dtype=auto`` (the default) keeps the dtype the checkpoint stores (fp32; bf16 for runs that hold
  bf16 weights); ``fp32``/``bf16`` cast. Merged weights are computed in fp32 and then cast.
- BOS: runs train without one (documents are joined by EOS, so in packed rows EOS is what precedes a
  document), so ``bos_token_id`` is the EOS id and the tokenizer adds no BOS, as GPT-2's export does.
- CoLA and CR-Net are refused in one line: B·σ(A·x) and the cross-layer carry are no LLaMA, and
  modeling code loaded with ``trust_remote_code=True`` would be a second implementation of each to keep
  in step with ours, executing code from the model directory on every load.
- The export is written into a temporary directory beside ``out`` and renamed into place; an existing
  non-empty ``out`` is replaced only with ``overwrite=true``, and never one that holds the run itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from lrpretrain.config import ModelConfig
from lrpretrain.data import TokenizerInfo
from lrpretrain.errors import ConfigError, UserError
from lrpretrain.storage import guarded_write
from lrpretrain.train.trained import TrainedRun, load_trained

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
MAX_SHARD_BYTES = 5 * 10**9  # HF's default max_shard_size, "5GB"
# our LLaMA's names -> HF LlamaForCausalLM's (per layer: layers.<i>.<ours> -> model.layers.<i>.<theirs>)
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
# ModelConfig fields this export writes into config.json (tests check that a new field is handled here)
EXPORTED_FIELDS = ("name", "dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len", "norm_eps",
                   "rope_theta", "init_std", "tie_embeddings")


@dataclass
class ExportRun:
    dir: str = "???"


@dataclass
class ExportConfig:
    run: ExportRun
    out: str = "???"
    checkpoint: str = "latest"  # latest | step_N | PATH to a checkpoint directory
    dtype: str = "auto"  # auto (as stored in the checkpoint) | fp32 | bf16
    overwrite: bool = False
    max_shard_bytes: int = MAX_SHARD_BYTES


def parse_overrides(args: list[str]) -> ExportConfig:
    schema = OmegaConf.structured(ExportConfig(run=ExportRun()))
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(args)))
    except Exception as e:
        raise ConfigError(f"bad export arguments {args}: {str(e).splitlines()[0]}; keys: run.dir, out, checkpoint, "
                          "dtype, overwrite, max_shard_bytes") from e
    assert isinstance(obj, ExportConfig)
    if obj.dtype not in ("auto", *DTYPES):
        raise ConfigError(f"dtype={obj.dtype} is invalid: allowed: auto, {', '.join(DTYPES)}")
    if obj.max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes={obj.max_shard_bytes} is invalid: must be > 0")
    return obj


def hf_name(name: str) -> str:
    """Our state_dict name -> HF LlamaForCausalLM's; KeyError for a name a LLaMA does not have."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    raise KeyError(name)


def hf_state_dict(dense: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Renamed, cast, contiguous tensors; the LM head left out when it is the embedding (tied)."""
    out = {}
    for name, t in dense.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF ties it to model.embed_tokens.weight on load
        try:
            key = hf_name(name)
        except KeyError:
            raise UserError(f"cannot export {name}: a LLaMA has no such tensor (the method's dense_weights() "
                            "must return plain LLaMA weights)") from None
        out[key] = t.detach().to("cpu", dtype).contiguous()
    expected = 2 + cfg.n_layers * len(LAYER_NAMES) + (0 if cfg.tie_embeddings else 1)
    if len(out) != expected:
        raise UserError(f"the method's dense weights hold {len(out)} LLaMA tensors, a {cfg.name} has {expected}")
    return out


def hf_config(cfg: ModelConfig, tok: TokenizerInfo, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": tok.eos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": HF_DTYPE[dtype],
        "dtype": HF_DTYPE[dtype],
    }


def generation_config(tok: TokenizerInfo) -> dict[str, Any]:
    return {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
            "do_sample": True, "temperature": 0.8, "top_k": 50}


def tokenizer_files(tok: TokenizerInfo, cfg: ModelConfig, eos: str, pad: str) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (a PreTrainedTokenizerFast)."""
    text = tok.tokenizer.to_str(pretty=True)
    special = {"bos_token": eos, "eos_token": eos, "pad_token": pad}
    unk = unk_token(json.loads(text).get("model") or {})
    if unk is not None:
        special["unk_token"] = unk
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None, **special,
              "clean_up_tokenization_spaces": False,
              "model_max_length": cfg.max_seq_len, "padding_side": "right"}
    return {"tokenizer.json": text,
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


def unk_token(model: dict[str, Any]) -> str | None:
    """The unknown token of a tokenizers model (BPE/WordPiece/WordLevel: ``unk_token``; Unigram: ``unk_id``)."""
    if isinstance(model.get("unk_token"), str):
        return model["unk_token"]
    vocab, unk_id = model.get("vocab"), model.get("unk_id")
    if isinstance(unk_id, int) and isinstance(vocab, list) and 0 <= unk_id < len(vocab):
        return vocab[unk_id][0]
    return None


def shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of at most ``max_bytes`` each (a larger tensor alone), in model order."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def write_weights(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> list[str]:
    """model.safetensors, or shards plus model.safetensors.index.json; returns the files written."""
    groups = shards(tensors, max_bytes)
    meta = {"format": "pt"}  # transformers checks it
    if len(groups) == 1:
        save_file(groups[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(out / fname), metadata=meta)
        files.append(fname)
        weight_map.update(dict.fromkeys(group, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*files, "model.safetensors.index.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; choose a directory")
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise ConfigError(f"out={out} holds the run itself ({run_dir}); choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={out} exists and is not empty; choose another directory or pass overwrite=true "
                          "to replace it")


def export_run(run: TrainedRun, out: Path, dtype: str = "auto", max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write ``run`` as an HF LLaMA directory at ``out`` (replacing what is there); the files written."""
    torch_dtype = run.stored_dtype if dtype == "auto" else DTYPES[dtype]
    if torch_dtype not in HF_DTYPE:
        raise UserError(f"the checkpoint stores {torch_dtype}; export with dtype=fp32 or dtype=bf16")
    dense = run.method.dense_weights(run.model)
    tensors = hf_state_dict(dense, run.cfg.model, torch_dtype)
    data = run.cfg.data
    texts = {"config.json": json.dumps(hf_config(run.cfg.model, run.tokenizer, torch_dtype), indent=2) + "\n",
             "generation_config.json": json.dumps(generation_config(run.tokenizer), indent=2) + "\n",
             **tokenizer_files(run.tokenizer, run.cfg.model, data.eos_token, data.pad_token)}
    out = out.absolute()
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with guarded_write(tmp, needed, after=f"nothing was exported; {out} is as it was"):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            files = write_weights(tensors, tmp, max_shard_bytes)
            for name, text in texts.items():
                (tmp / name).write_text(text)
            mode = 0o666 & ~_umask()
            for f in tmp.iterdir():  # safetensors creates its files 0600; an export is meant to be shared
                f.chmod(mode)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [*files, *texts]


def main(args: list[str]) -> int:
    e = parse_overrides(args)
    run_dir, out = Path(e.run.dir), Path(e.out)
    check_out(out, run_dir, e.overwrite)
    run = load_trained(run_dir, e.checkpoint)
    files = export_run(run, out, e.dtype, e.max_shard_bytes)
    print(f"export: {run.checkpoint} (step {run.step}, method={run.cfg.method.name}) -> {out} "
          f"({', '.join(files)})", file=sys.stderr)
    print(out)
    return 0
