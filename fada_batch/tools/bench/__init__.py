"""Throughput, memory and wall-time estimates: what `fada-batch bench` prints.

    result = run_bench(cfg, steps=10, baseline=True)
    print(format_report(result))

`bench_ours` trains the production path for a fixed number of optimizer steps: the
frozen-feature cache (`features.FeatureSource`), length-grouped steps (`step.epoch_steps`),
dynamic padding (`collate`), the token-mean loss over each step (`step.accumulate_step`) and
AdamW. It reports samples/s, tokens/s and peak memory; the feature cache is timed apart,
because it runs once per image and is reused by 8 questions in every epoch.

`bench_seed` runs the seed's recipe on the same samples: 8-bit weights, batch 1, the prompt
padded to 256 tokens and the answer to 128, the vision tower and Q-Former run for every
sample, HF `Trainer` with gradient checkpointing. Its ratio to ours is the speed-up.

`estimate` turns a samples/s figure into a wall time per category (from the pre-flight
counts) and the sbatch `--time` to ask for. The inputs are synthetic but shaped like the
configured model's (its image size, the standard questions through the prompt template,
short clinical answers), so no data set is needed; `category=` uses a category's real data.

`make_bench_model` saves a random-weight BLIP-2 whose vision tower outweighs its language
model per sample in the same proportion as blip2-opt-2.7b's, for measuring on a CPU.

One module per thing the bench holds: `inputs` (the samples, synthetic or a category's), `ours`
(`bench_ours`), `seed` (`bench_seed` and the timed `Trainer` loop), `measure` (peak memory,
`RecipeResult`, the machine), `estimates` (`estimate`, `sbatch_time`), `model` (the bench model,
blip2-opt-2.7b's architecture, parameters and FLOPs), `report` (`format_report`) and `runner`
(`run_bench`, which runs them in order). Their public names are importable from here too.
"""

from __future__ import annotations

from fada_batch.tools.bench.estimates import (
    EVAL_COST,
    REFERENCE_IMAGES,
    ROUND_S,
    SAFETY,
    SLACK_S,
    CategoryEstimate,
    category_counts,
    estimate,
    sbatch_seconds,
    sbatch_time,
)
from fada_batch.tools.bench.inputs import (
    BenchInputs,
    category_inputs,
    load_for_bench,
    make_encoder,
    synthetic_inputs,
)
from fada_batch.tools.bench.measure import PeakMemory, RecipeResult, machine_info
from fada_batch.tools.bench.model import (
    BENCH_MARKER,
    BLIP2_OPT_27B,
    BenchModelRecipe,
    blip2_config,
    build_bench_model,
    build_random_model,
    make_bench_model,
    parameter_counts,
    per_sample_flops,
)
from fada_batch.tools.bench.ours import bench_ours
from fada_batch.tools.bench.report import format_report
from fada_batch.tools.bench.runner import run_bench
from fada_batch.tools.bench.seed import (
    SEED_ANSWER_LEN,
    SEED_PROMPT_LEN,
    SeedDataset,
    bench_seed,
    time_trainer,
)

__all__ = [
    "BENCH_MARKER",
    "BLIP2_OPT_27B",
    "EVAL_COST",
    "REFERENCE_IMAGES",
    "ROUND_S",
    "SAFETY",
    "SEED_ANSWER_LEN",
    "SEED_PROMPT_LEN",
    "SLACK_S",
    "BenchInputs",
    "BenchModelRecipe",
    "CategoryEstimate",
    "PeakMemory",
    "RecipeResult",
    "SeedDataset",
    "bench_ours",
    "bench_seed",
    "blip2_config",
    "build_bench_model",
    "build_random_model",
    "category_counts",
    "category_inputs",
    "estimate",
    "format_report",
    "load_for_bench",
    "machine_info",
    "make_bench_model",
    "make_encoder",
    "parameter_counts",
    "per_sample_flops",
    "run_bench",
    "sbatch_seconds",
    "sbatch_time",
    "synthetic_inputs",
    "time_trainer",
]
