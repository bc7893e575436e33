# Evaluation: each system on each benchmark → per-utterance outputs (Parquet) + a score file; the CoVoST 2
# X→en test manifest from a local release (when evaluate.covost2.release_dir is set).
# A job decodes in batches and keeps each finished one in <output>.partial.jsonl, so a killed or stopped job
# resumes (evaluate/shards.py). With evaluate.shards: N > 1 the batches are split over N jobs (one Slurm job
# array), whose outputs rule evaluate_gather turns into the same Parquet and score file.

if EVAL_SHARDS == 1:

    rule evaluate:
        input:
            unpack(model_inputs),
            model=system_model,
            manifests=benchmark_manifests,
        output:
            hyps="results/eval/{benchmark}/{system}.parquet",
            scores="results/eval/{benchmark}/{system}.scores.json",
        params:
            settings=lambda wc: eval_settings(),
            decoder=system_decoder,
            launcher=launcher,
        log:
            "logs/eval/{benchmark}/{system}.log",
        benchmark:
            "logs/benchmark/evaluate/{benchmark}/{system}.tsv"
        threads: rule_resources("evaluate")["cpu_threads"]
        resources:
            **job_resources("evaluate"),
        conda:
            "../envs/speechllm.yaml"
        shell:
            "{params.launcher} speechllm evaluate {wildcards.benchmark} --settings {params.settings:q} "
            "--model {input.model} --name {wildcards.system} --decoder {params.decoder} "
            "--manifests {input.manifests} --hyps {output.hyps} --scores {output.scores} --threads {threads} "
            "--record {log} > {log} 2>&1"

else:

    rule evaluate:
        input:
            unpack(model_inputs),
            model=system_model,
            manifests=benchmark_manifests,
        output:
            "results/eval/{benchmark}/{system}.shards/shard{shard}.json",
        params:
            settings=lambda wc: eval_settings(),
            decoder=system_decoder,
            launcher=launcher,
            num_shards=EVAL_SHARDS,
        log:
            "logs/eval/{benchmark}/{system}.shard{shard}.log",
        benchmark:
            "logs/benchmark/evaluate/{benchmark}/{system}.shard{shard}.tsv"
        threads: rule_resources("evaluate")["cpu_threads"]
        resources:
            **job_resources("evaluate"),
        conda:
            "../envs/speechllm.yaml"
        shell:
            "{params.launcher} speechllm evaluate {wildcards.benchmark} --settings {params.settings:q} "
            "--model {input.model} --name {wildcards.system} --decoder {params.decoder} "
            "--manifests {input.manifests} --shard {wildcards.shard} --num-shards {params.num_shards} "
            "--rows {output} --threads {threads} --record {log} > {log} 2>&1"

    rule evaluate_gather:
        input:
            rows=eval_shard_rows,
            manifests=benchmark_manifests,
        output:
            hyps="results/eval/{benchmark}/{system}.parquet",
            scores="results/eval/{benchmark}/{system}.scores.json",
        params:
            settings=lambda wc: eval_settings(),
            model=system_model,
            decoder=system_decoder,
        log:
            "logs/eval/{benchmark}/{system}.gather.log",
        benchmark:
            "logs/benchmark/evaluate_gather/{benchmark}/{system}.tsv"
        threads: rule_resources("evaluate_gather")["cpu_threads"]
        resources:
            **job_resources("evaluate_gather"),
        conda:
            "../envs/speechllm.yaml"
        shell:
            "speechllm evaluate gather {wildcards.benchmark} --settings {params.settings:q} --model {params.model} "
            "--name {wildcards.system} --decoder {params.decoder} --manifests {input.manifests} --rows {input.rows} "
            "--hyps {output.hyps} --scores {output.scores} --record {log} > {log} 2>&1"


rule covost2_data:
    output:
        COVOST2_MANIFEST,
    params:
        settings=lambda wc: as_json({"evaluate": {"covost2": config["evaluate"]["covost2"]}}),
    log:
        "logs/eval/covost2_data.log",
    benchmark:
        "logs/benchmark/covost2_data.tsv"
    threads: rule_resources("covost2_data")["cpu_threads"]
    resources:
        **job_resources("covost2_data"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm evaluate covost2-manifest --settings {params.settings:q} --out {output} --record {log} > {log} 2>&1"
