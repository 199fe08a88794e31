"""train.py's weights in and out: the pretrained model into FSDP shards, the resumable checkpoint, the HF export.

A checkpoint is OUT/checkpoints/step_N: the model and optimiser shards (torch.distributed.checkpoint) and each
rank's trainer state as JSON (trainer_rank{r}.json: step, schedule, sampler position, RNG, settings). Only DCP's
own metadata is unpickled, through an allowlist (MetadataReader), so a checkpoint folder from elsewhere cannot
run code on --resume. It is written as step_N.tmp and renamed when every rank is done: a step_N folder is always
complete.
"""
import base64
import enum
import json
import os
import pickle
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from transformers import AutoModelForCausalLM

from common import UserError

# train.py's flags that may change on resume: they steer the run or name where things are (the caches are
# validated on their own); micro-batching and layout too, since the normaliser is the step's global label count
RUN_CONTROL = {"resume", "stop_after", "save_every", "save_minutes", "keep", "export_on_save", "wandb",
               "activation_checkpointing", "data_cache", "teacher_cache", "ref_cache", "micro_batch_size",
               "micro_batch_tokens", "layout", "loss_chunk_size", "quadrant_threshold"}


class MetadataReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's reader, with its .metadata file (a pickle, which DCP loads as it is)
    unpickled through an allowlist, as HF Trainer reads RNG states: DCP's own metadata classes, torch sizes,
    dtypes and layouts, paths. A pickle naming anything else (os.system, say) is refused, not run."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "Path"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    @staticmethod
    def allowed(module, name):
        return ((module, name) in MetadataReader.ALLOWED or module == "torch.distributed.checkpoint.metadata"
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("builtins", "getattr"):  # Python 3.11.2's enum pickles a member by name
                return self.enum_member
            if MetadataReader.allowed(module, name):
                return super().find_class(module, name)
            raise UserError(f"{self.path}: its checkpoint metadata names {module}.{name}, which a checkpoint "
                            "written by train.py never does; refused unread (a pickle can run code)")

        def enum_member(self, cls, name):
            """getattr(cls, name), as 3.11.2's Enum.__reduce_ex__ names a member (3.11.7's pickles cls(value)):
            a member of an allowed enum, never an attribute in general (getattr(path, "mkdir")() would run it)."""
            if (isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str)
                    and MetadataReader.allowed(cls.__module__, cls.__qualname__) and name in cls.__members__):
                return cls[name]
            raise UserError(f"{self.path}: its checkpoint metadata calls getattr({cls!r}, {name!r}), which names no "
                            "member of an allowed enum, as a checkpoint written by train.py never does; refused "
                            "unread (a pickle can run code)")

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with open(path, "rb") as f:
            unpickler = self.Unpickler(f)
            unpickler.path = path
            metadata = unpickler.load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checkpoint_dirs(out):
    """Complete checkpoints under out, oldest first (a step_N.tmp is an unfinished save)."""
    return sorted(p for p in (out / "checkpoints").glob("step_*") if p.suffix != ".tmp")


def model_identity(name, config):
    return {"name": name, **{key: getattr(config, key) for key in (
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}}


def load_pretrained(model, name):
    """The pretrained weights into the trained module's shards (train.QTargetLM: the model under `.lm`). Rank 0
    reads them once and broadcasts them: host RAM holds one full fp32 copy, not one per GPU (8 x 30 GB at 7B)."""
    rank = dist.get_rank()
    full = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32) if rank == 0 else None
    set_model_state_dict(model, {f"lm.{k}": v for k, v in full.state_dict().items()} if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer_name, buffer in model.named_buffers():  # not in the state dict (rotary inv_freq), left empty by to_empty
        if rank == 0:
            buffer.copy_(full.get_buffer(buffer_name.removeprefix("lm.")))
        dist.broadcast(buffer, src=0)
    if rank == 0:
        model.lm.generation_config = full.generation_config  # export_hf (rank 0) writes it


def trainer_state(step, scheduler, sampler, model_id, args):
    """What a rank needs besides the shards to continue exactly: JSON, its RNG state as base64 bytes."""
    return {"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
            "rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(), "model": model_id,
            "args": args}


def save(out, step, model, optimizer, state, keep):
    """Every rank's shards and trainer state into step_N.tmp, renamed step_N when all are written; then only the
    last `keep` checkpoints are kept."""
    rank = dist.get_rank()
    final = out / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_suffix(".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    (tmp / f"trainer_rank{rank}.json").write_text(json.dumps(state))
    dist.barrier()
    if rank == 0:
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()


def read_trainer_state(path, args):
    """This rank's trainer state, read before the model loads. Refuses what would resume wrongly."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    written_by = len(list(path.glob("trainer_rank*.json")))
    if written_by != world_size:
        raise UserError(f"{path} was written by {written_by} ranks, this run has {world_size}: the data order is "
                        "dealt per rank, so resume with the same world size")
    state = json.loads((path / f"trainer_rank{rank}.json").read_text())
    if state["args"]["model"] != args.model:
        raise UserError(f"{path} is a checkpoint of {state['args']['model']}, not of --model {args.model}; "
                        "point --out elsewhere or drop --resume")
    # a flag that no longer exists (e.g. --no-packing, now --layout) is taken as unchanged
    changed = {k: (v, vars(args)[k]) for k, v in state["args"].items()
               if k not in RUN_CONTROL and vars(args).get(k, v) != v}
    if changed:
        raise UserError(f"{path} was trained with other settings {changed} (checkpoint, now): resuming would not "
                        "continue the same run; use the checkpoint's settings or another --out")
    return state


def load(path, model, optimizer, state, scheduler, sampler):
    """Model and optimiser shards in place, then the schedule, the sampler and the RNG where they stood."""
    if state["model"] != model_identity(state["args"]["model"], model.lm.config):
        raise UserError(f"{path} holds {state['model']}, not --model {state['args']['model']} as that folder is now")
    model_state, optim_state = get_state_dict(model, optimizer)
    shards = {"model": model_state, "optim": optim_state}
    reader = MetadataReader(path)
    reader.read_metadata()  # refused here, in one line: inside dcp.load a refusal comes wrapped in DCP's exception
    dcp.load(shards, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optim"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8))


def export_hf(path, model, tokenizer, dtype, end_of_turn):
    """The trained module's model as a folder transformers and vLLM load directly: safetensors, config, tokenizer,
    generation config."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model = model.lm
    if dist.get_rank() == 0:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # a base model's eos is often <|endoftext|>, but training taught it to end its turn with the template's
        # end-of-turn token: vLLM and generate() must stop at that too
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        model.generation_config.eos_token_id = sorted(set(eos) | {end_of_turn})
        model.save_pretrained(tmp, state_dict={k.removeprefix("lm."): v.to(dtype) for k, v in state.items()},
                              safe_serialization=True)
        model.config.dtype = dtype  # save_pretrained records the fp32 master weights' dtype; vLLM's "auto" reads it
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()
