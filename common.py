"""What the scripts set up the same way: the error a user's mistake raises, where a model comes from, the
distributed start, the attention kernel and peak memory.

torch is imported by the functions that use it: eval.py imports this module, and its grading pool's spawned
workers re-run eval.py's imports, which must stay free of torch (they grade text).
"""
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

# Every script imports this module before torch asks whether CUDA is there. Plain torch.cuda.is_available() calls
# cudaGetDeviceCount, after which a forked child cannot use CUDA (torch 2.13, torch/cuda/__init__.py:169-183);
# it does not count as initialising CUDA, so vLLM still forks its engine core (vllm 0.32.0,
# vllm/utils/system_utils.py:144, spawn only once torch.cuda.is_initialized()) and the engine dies with "Cannot
# re-initialize CUDA in forked subprocess". The NVML-based check leaves fork usable; vLLM sets the same on import
# (vllm/env_override.py:164), too late where torch asked first (eval.py's sampling_mode).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


class UserError(ValueError):
    """A user's mistake: a bad flag, bad data, a missing or mismatched cache or checkpoint. Its message names the
    problem and the fix. A script ends on it with one `error: ...` line (report_user_errors); any other
    exception is a bug and keeps its traceback."""


def summary(error):
    """An exception in one line: its type and its message's first line (a library's message can run long)."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def report_user_errors(parser=None):
    """Called first by each script: an uncaught UserError (and the parser's own errors) prints one `error:` line,
    once under torchrun (rank 0), and exits with status 1; every other exception prints its traceback."""
    def hook(kind, error, traceback):
        if not issubclass(kind, UserError):
            return previous(kind, error, traceback)
        if os.environ.get("RANK", "0") == "0":  # sys.__stderr__: torch's hook prefixes what reaches sys.stderr
            print(f"error: {error}", file=sys.__stderr__, flush=True)

    def parser_error(message):
        raise UserError(message)

    if parser is not None:
        parser.error = parser_error
    previous, sys.excepthook = sys.excepthook, hook


def path(value):
    """argparse's type of every path flag: an empty value (a variable left unset in a job script, say) is refused
    as the flags are parsed, naming the flag, before anything loads. Path("") is ".", the working folder."""
    import argparse
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder")
    return value


# ------------------------------------------------------------------------------------------------ the hub


def is_hub_id(name):
    """'owner/name' as the hub spells repository ids (a path that does not exist may look the same)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)) is not None and not str(name).startswith((".", "/"))


def check_model(flag, name):
    """Finds a model's config.json before anything heavy starts: in a local folder, in the local hub cache, or
    (online) on the hub. Anything else is the user's mistake, named with its flag."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {name}: a folder without config.json; give a model folder (train.py's OUT/hf) "
                            "or a hub id such as Qwen/Qwen2.5-Math-1.5B")
        return
    if not is_hub_id(name):
        raise UserError(f"{flag} {name}: no such folder, and not a hub id (owner/name such as "
                        "Qwen/Qwen2.5-Math-1.5B)")
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{flag} {name}: not a local folder and not in the local hub cache "
                        f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids downloading it; download it first "
                        f"(hf download {name}) or unset HF_HUB_OFFLINE")
    try:
        hf_hub_download(name, "config.json")
    except Exception as e:  # no network, no such repository, a gated one without a token: all end here
        reason = summary(e)
        raise UserError(f"{flag} {name}: not a local folder, not in the local hub cache, and not reachable on the "
                        f"hub ({reason}); check the id and the network; gated repositories (meta-llama) need a "
                        "hub token (hf auth login)") from None


def slug(text):
    """A folder name's safe form of any text: runs of other characters than letters, digits and dots become '-'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-")


# ---------------------------------------------------------------------------------------------- the ranks


def start_distributed(always=False):
    """(rank, world_size, device) of this process. Under torchrun (WORLD_SIZE set) it joins the process group:
    NCCL on GPUs, each rank on its own (LOCAL_RANK), gloo on CPUs. A plain `python script.py` is a world of one
    with no group, unless `always` (FSDP needs one): then it starts one of its own."""
    import torch
    import torch.distributed as dist
    if always and "WORLD_SIZE" not in os.environ:
        import socket
        with socket.socket() as s:  # a free port for the world of one
            s.bind(("localhost", 0))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost",
                              MASTER_PORT=str(s.getsockname()[1]))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # before the group: NCCL binds each rank to its own GPU, not all to GPU 0
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        # ranks wait at barriers while rank 0 tokenises a dataset or writes an export: NCCL's 10 minutes are too few
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    return (*rank_and_world(), device)


def rank_and_world():
    """(rank, world_size): (0, 1) outside a process group."""
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def stop_distributed():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def check_shared_folders(folders):
    """Under torchrun, every rank must see the same folders ({flag: folder}): rank 0 tokenises and builds the
    caches there and the others read them, and checkpoints land there. Rank 0 writes a marker of this run into
    each; after a barrier every rank reads it back. A rank that cannot (nodes that do not share the filesystem)
    ends the run in one error line naming the flag that moves the folder."""
    import secrets
    import torch.distributed as dist
    rank, world = rank_and_world()
    if world == 1:
        return
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    markers = {flag: Path(folder) / f".shared-check-{token[0]}" for flag, folder in folders.items()}
    if rank == 0:
        for marker in markers.values():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(token[0])
    dist.barrier()
    unseen = [flag for flag, marker in markers.items() if not (marker.is_file() and marker.read_text() == token[0])]
    everyone = [None] * world
    dist.all_gather_object(everyone, unseen)
    if rank == 0:
        for marker in markers.values():
            marker.unlink()
    for other, flags in enumerate(everyone):
        for flag in flags:
            raise UserError(f"{flag} {folders[flag]}: rank {other} cannot read what rank 0 wrote into this folder, so "
                            "the nodes do not share it; every node must see the same folder (a shared filesystem): "
                            f"point {flag} at one they share")


def on_rank0(work):
    """Runs work() on rank 0 while the other ranks wait. A UserError it raises (a bad row, say) is raised on every
    rank: each stops on it, and rank 0 alone reports it (report_user_errors)."""
    import torch.distributed as dist
    rank, world = rank_and_world()
    failure = None
    if rank == 0:
        try:
            work()
        except UserError as e:
            failure = e
    if world > 1:
        message = [None if failure is None else str(failure)]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and failure is None:
            raise UserError(message[0])
    if failure is not None:
        raise failure


# ------------------------------------------------------------------------------------------ the machine


def attention_implementation(device, dtype):
    """(transformers' attn_implementation, why): flash-attn's varlen kernel where it can run, else sdpa.

    flash-attn runs only where all three hold: its kernels import (a wheel built against another torch is
    found by the package manager but fails at import with an undefined symbol), the device is CUDA, and the
    compute dtype is bf16 or fp16 (it refuses fp32 q/k/v, which transformers leaves in the weights' dtype)."""
    import importlib.util
    import torch
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed"
    if torch.device(device).type != "cuda":
        return "sdpa", "flash-attn needs a CUDA device"
    if dtype not in (torch.bfloat16, torch.float16):
        return "sdpa", "flash-attn needs bf16/fp16"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401  the compiled kernels, not only the package
    except Exception as e:  # ImportError, OSError from a shared library: anything means it cannot run
        return "sdpa", f"flash-attn does not import ({summary(e)})"
    return "flash_attention_2", "flash-attn's varlen kernel"


DTYPES = ("auto", "bf16", "fp32")  # --dtype of teacher_cache.py and lens.py


def load_model(name, device, dtype="auto"):
    """A model to score packed rows with (teacher_cache.py's teacher, lens.py's student), in `dtype` (DTYPES;
    auto: bf16 on GPU, fp32 on CPU; the logits are fp32 either way: loss.logits_fp32), with flash-attn varlen
    where it can run, else sdpa (both honour packed rows). Says which on rank 0."""
    import torch
    from transformers import AutoModelForCausalLM
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    attention, why = attention_implementation(device, dtype)
    if rank_and_world()[0] == 0:
        print(f"{name}: {str(dtype).removeprefix('torch.')}, attention: {attention} ({why})", flush=True)
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attention).to(device).eval()


def free(model):
    """Give a model's memory back before the next one loads (train.py's student after its teacher)."""
    import gc
    import torch
    model.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pyplot():
    """matplotlib's pyplot, drawing into files (the Agg backend: a cluster node has no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


PROC = Path("/proc/self")  # Linux: where a CPU process reads and resets its peak RSS


def reset_peak_memory(device):
    """The next peak_memory_gib is the peak from now on, not the process's so far."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif (PROC / "clear_refs").exists():
        (PROC / "clear_refs").write_text("5")  # the peak RSS restarts from the current RSS


def peak_memory_gib(device):
    """Peak memory since reset_peak_memory: the allocator's on a GPU, the process's RSS on a Linux CPU, else None."""
    import torch
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    if (PROC / "clear_refs").exists():
        return int(re.search(r"VmHWM:\s*(\d+) kB", (PROC / "status").read_text())[1]) / 2**20
    return None
