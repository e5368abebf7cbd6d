"""GPT pretraining (Radford et al. 2019, as reproduced by nanoGPT): train a decoder-only transformer, then sample.

    python -m experiments.gpt                          # char-level GPT on the embedded Python-stdlib corpus
    python -m experiments.gpt --preset=shakespeare_char_cpu --data=tinyshakespeare
    python -m experiments.gpt --mode=sample --workdir=runs/gpt
    python -m experiments.gpt --preset=llama_small --n_layer=6 --learning_rate=3e-4   # any config field is a flag
    python -m experiments.gpt --preset=gpt2-xl --mesh=fsdp:8 --compile_only   # per-device memory, nothing allocated
    ./launch.sh --num_processes=2 experiments.gpt --mesh=data:2,fsdp:2         # multi-process (see launch.sh)

Re-running with the same --workdir resumes from its latest checkpoint. On CPU the batch is sharded over one XLA
device per core (see llmjax.runtime); --mesh chooses another layout (llmjax.sharding).

Writes to --workdir: checkpoints/, metrics.jsonl, tensorboard/, tokenizer/, config.json and summary.json with keys
    train_loss, val_loss  final losses (nats/token) over --eval_iters fixed batches of each split
    iters                 optimizer steps done
    params                parameter count (all arrays, tied embeddings counted once)
    tokens_per_sec        training tokens per second, compile/eval/checkpoint time excluded
    ms_per_iter           milliseconds per optimizer step (same accounting)
    mfu                   model FLOPs utilisation against llmjax.flops.peak_flops()
    wall_time_s           whole run, data preparation to the last sample
    compile_time_s        ahead-of-time compile of the train step
"""

from llmjax import runtime

runtime.use_all_cpu_cores()  # before JAX is imported

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from llmjax import config as config_lib  # noqa: E402
from llmjax import data as data_lib  # noqa: E402
from llmjax import distributed, flops, model, sharding, train  # noqa: E402
from llmjax.checkpoint import Checkpointer  # noqa: E402
from llmjax.errors import UserError, absl_main  # noqa: E402
from llmjax.generate import SamplingConfig, sample_long  # noqa: E402
from llmjax.metrics import console  # noqa: E402
from llmjax.optim import make_optimizer  # noqa: E402
from llmjax.tokenizers import load_tokenizer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "train", ["train", "sample"], "train (then sample), or only sample from --workdir")
flags.DEFINE_string("preset", "shakespeare_char_cpu", f"one of {', '.join(config_lib.PRESETS)}")
flags.DEFINE_string("data", "pystdlib", "pystdlib | text:PATH (file or folder) | hf:NAME[:CONFIG]")
flags.DEFINE_enum("tokenizer", "char", ["char", "byte", "bpe"], "tokenizer trained/built on the corpus")
flags.DEFINE_string("text_field", "text", "column holding the text, for hf: sources")
flags.DEFINE_string("data_cache", None, "token cache root (default ~/.cache/llmjax/data)")
flags.DEFINE_string("workdir", "runs/gpt", "outputs and checkpoints; rerunning with it resumes")
flags.DEFINE_string("mesh", "auto", "device mesh, e.g. data:2 or data:2,fsdp:2,tensor:2 (-1 infers an axis); "
                    "auto: data-parallel over the devices that divide the batch")
flags.DEFINE_integer("num_samples", 2, "samples printed after training / in sample mode")
flags.DEFINE_integer("sample_tokens", 300, "tokens per sample")
flags.DEFINE_float("temperature", 0.8, "sampling temperature (0 = greedy)")
flags.DEFINE_integer("top_k", 200, "sample from the top k tokens (0 = all)")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_string("prompt", "\n", "text the samples start from")
flags.DEFINE_bool("compile_only", False, "compile the train step of --preset for --mesh from shapes alone (no data, "
                  "no params) and print XLA's per-device memory beside the same step on one device")
# Every ModelConfig / TrainConfig field is also a flag (default: the preset's value).
_FIELD_TYPES = config_lib.config_field_types()
for _name in _FIELD_TYPES:
    flags.DEFINE_string(_name, None, f"override the preset's {_name}")


def config_overrides() -> dict:
    """The config fields given on the command line, parsed to their types."""
    overrides = {}
    for name, kind in _FIELD_TYPES.items():
        raw = FLAGS[name].value
        if raw is None:
            continue
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                overrides[name] = raw.lower() in ("true", "1")
            else:
                overrides[name] = None if raw.lower() == "none" else kind(raw)
        except ValueError:
            raise UserError(f"--{name}={raw!r} is not a valid {kind.__name__}") from None
    return overrides


def auto_mesh(micro_batch: int) -> dict[str, int]:
    """Data parallel over the largest number of devices that divides the micro-batch."""
    n = max(d for d in range(1, jax.device_count() + 1) if jax.device_count() % d == 0 and micro_batch % d == 0)
    return {"data": n, "fsdp": 1, "tensor": 1}


def build_mesh(tc: config_lib.TrainConfig) -> jax.sharding.Mesh:
    micro = tc.batch_size // tc.grad_accum
    if FLAGS.mesh == "auto":
        sizes = auto_mesh(micro)
        return sharding.make_mesh(sizes, jax.devices()[: math.prod(sizes.values())])
    return sharding.make_mesh(sharding.parse_mesh(FLAGS.mesh, jax.device_count()))


def train_main() -> None:
    wall_start = time.perf_counter()
    overrides = config_overrides()
    config_lib.from_preset(FLAGS.preset, **overrides)  # validate flags before touching data
    dataset = data_lib.prepare_data(
        FLAGS.data, FLAGS.tokenizer, vocab_size=overrides.get("vocab_size") if FLAGS.tokenizer == "bpe" else None,
        cache_dir=FLAGS.data_cache, text_field=FLAGS.text_field,
    )
    overrides["vocab_size"] = dataset.tokenizer.vocab_size
    cfg, tc = config_lib.from_preset(FLAGS.preset, **overrides)
    mesh = build_mesh(tc)
    n_params = model.count_params(jax.eval_shape(lambda: model.init(cfg, jax.random.key(0))))
    console(f"{FLAGS.preset}: {n_params:,} parameters, vocab {cfg.vocab_size}, {len(dataset.train_tokens):,} train "
            f"tokens, mesh {dict(mesh.shape)}")

    p_index, p_count = sharding.process_batch_slice(mesh)  # the rows this process's devices hold

    def batch_fn(step: int) -> dict[str, np.ndarray]:
        x, y = data_lib.batch_for_step(dataset.train_tokens, seed=tc.seed, step=step, batch_size=tc.batch_size,
                                       block_size=cfg.block_size, process_index=p_index, process_count=p_count)
        return {"x": x, "y": y}

    def eval_batches(tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
        # A fixed set of batches (its own seed stream), so evaluations along the run are comparable.
        micro = tc.batch_size // tc.grad_accum
        batches = []
        for i in range(tc.eval_iters):
            x, y = data_lib.batch_for_step(tokens, seed=tc.seed + 1, step=i, batch_size=micro,
                                           block_size=cfg.block_size, process_index=p_index, process_count=p_count)
            batches.append({"x": x, "y": y})
        return batches

    optimizer = make_optimizer(tc, model.param_axes(cfg))
    trainer = train.Trainer(cfg, tc, mesh, train.lm_loss(cfg), optimizer)
    meta = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tc), "data": dataset.meta,
            "preset": FLAGS.preset}
    state, summary = train.run_loop(
        trainer, workdir=FLAGS.workdir, batch_fn=batch_fn,
        eval_sets={"train": eval_batches(dataset.train_tokens), "val": eval_batches(dataset.val_tokens)},
        meta=meta, flops_per_step=flops.flops_per_token(cfg) * tc.batch_size * cfg.block_size,
        peak_flops=flops.peak_flops(),
    )
    if jax.process_index() == 0:
        dataset.tokenizer.save(os.path.join(FLAGS.workdir, "tokenizer"))
        _write_json(os.path.join(FLAGS.workdir, "config.json"), meta)
    print_samples(state["params"], cfg, dataset.tokenizer, tc.seed)
    summary.update(params=n_params, wall_time_s=time.perf_counter() - wall_start)
    if jax.process_index() == 0:
        _write_json(os.path.join(FLAGS.workdir, "summary.json"), summary)
    console(json.dumps({k: summary[k] for k in ("train_loss", "val_loss", "iters", "tokens_per_sec", "mfu")
                        if k in summary}))


def compile_main() -> None:
    """Compile the train step for --preset on --mesh from abstract inputs and print per-device memory.

    Catches sharding and memory problems of a big model before any hardware is booked: everything is a
    jax.ShapeDtypeStruct, so nothing the size of the model is allocated. The same step compiled for one device
    is the unsharded figure the mesh is compared with.
    """
    cfg, tc = config_lib.from_preset(FLAGS.preset, **config_overrides())
    mesh = build_mesh(tc)
    n_params = model.count_params(jax.eval_shape(lambda: model.init(cfg, jax.random.key(0))))
    console(f"compile_only {FLAGS.preset}: {n_params:,} parameters, batch {tc.batch_size}×{cfg.block_size} "
            f"in {tc.grad_accum} micro-batch(es), mesh {dict(mesh.shape)}")
    one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    reports = {"per_device": _step_memory(cfg, tc, mesh), "unsharded": _step_memory(cfg, tc, one_device)}
    for kind in reports["per_device"]:
        for name, report in reports.items():
            console(f"memory_{kind}_bytes_{name} {report[kind]} bytes")
    console(f"memory_peak_per_device_over_unsharded {reports['per_device']['peak'] / reports['unsharded']['peak']:.4f} "
            "ratio")


def _step_memory(cfg: config_lib.ModelConfig, tc: config_lib.TrainConfig, mesh: jax.sharding.Mesh) -> dict[str, int]:
    """XLA's per-device memory analysis of the train step compiled for `mesh` from abstract state and batch."""
    trainer = train.Trainer(cfg, tc, mesh, train.lm_loss(cfg), make_optimizer(tc, model.param_axes(cfg)))
    shape = (tc.grad_accum, tc.batch_size // tc.grad_accum, cfg.block_size)
    tokens = jax.ShapeDtypeStruct(shape, np.int32, sharding=trainer.batch_sharding)
    seconds = trainer.compile(trainer.abstract_state(), {"x": tokens, "y": tokens})
    console(f"compiled for mesh {dict(mesh.shape)} in {seconds:.1f}s")
    return sharding.memory_report(trainer.compiled_step)


def sample_main() -> None:
    ckpt_dir = os.path.join(FLAGS.workdir, "checkpoints")
    with Checkpointer(ckpt_dir) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"no checkpoint in {ckpt_dir}: train first with --workdir={FLAGS.workdir}")
        meta = ckpt.restore_meta(step)
        cfg = config_lib.ModelConfig(**meta["model"]).validate()
        tc = config_lib.TrainConfig(**meta["train"]).validate()
        optimizer = make_optimizer(tc, model.param_axes(cfg))
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        trainer = train.Trainer(cfg, dataclasses.replace(tc, batch_size=1, grad_accum=1), mesh,
                                train.lm_loss(cfg), optimizer)
        state, _ = ckpt.restore(trainer.abstract_state(), step)
    tokenizer_dir = os.path.join(FLAGS.workdir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise UserError(f"{tokenizer_dir} is missing: the run did not finish; train again to write it")
    print_samples(state["params"], cfg, load_tokenizer(tokenizer_dir), tc.seed)


def print_samples(params: model.Params, cfg: config_lib.ModelConfig, tokenizer, seed: int) -> None:
    prompt = [int(t) for t in tokenizer.encode(FLAGS.prompt)]
    sc = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k or None,
                        top_p=FLAGS.top_p if FLAGS.top_p < 1 else None)
    key = jax.random.key(seed)
    for i in range(FLAGS.num_samples):
        tokens = sample_long(params, prompt, jax.random.fold_in(key, i), cfg=cfg, num_tokens=FLAGS.sample_tokens,
                             sc=sc)
        console(f"--- sample {i + 1} ---\n{tokenizer.decode(prompt + tokens)}")


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def main() -> None:
    distributed.maybe_initialize()  # before anything touches devices
    if FLAGS.compile_only:
        compile_main()
    elif FLAGS.mode == "train":
        train_main()
    else:
        sample_main()


if __name__ == "__main__":
    app.run(absl_main(main))
