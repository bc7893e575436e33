# Synthetic multi-instruction targets: the frozen LLM continues prefix + transcript + postfix (scattered
# over shards, one job each), then T / MI / TMI training manifests are assembled.


rule generate_targets:
    input:
        unpack(model_inputs),
        manifest="results/data/train.jsonl",
    output:
        "results/targets/shard{shard}.jsonl",
    params:
        settings=as_json({
            **{k: config["targets"][k] for k in ("templates", "templates_per_occurrence", "batch_size",
                                                 "max_new_tokens", "num_beams")},
            "llm": config["models"]["llm"],
            "seed": config["seed"],
        }),
        num_shards=config["targets"]["shards"],
    log:
        "logs/targets/generate_shard{shard}.log",
    threads: config["resources"]["cpu_threads"]
    resources:
        gpu=config["resources"]["gpu"],
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm targets generate --settings {params.settings:q} --manifest {input.manifest} "
        "--shard {wildcards.shard} --num-shards {params.num_shards} --out {output} --threads {threads} > {log} 2>&1"


rule assemble_targets:
    input:
        manifest="results/data/train.jsonl",
        shards=expand("results/targets/shard{shard}.jsonl", shard=TARGET_SHARDS),
    output:
        expand("results/data/train_{variant}.jsonl", variant=CE_VARIANTS),
    params:
        settings=as_json({
            "prompt": config["models"]["prompt"],
            "mi_reading": config["targets"]["mi_reading"],
            "templates_per_occurrence": config["targets"]["templates_per_occurrence"],
        }),
        out_dir=lambda wc, output: parent_dir(output[0], 1),
    log:
        "logs/targets/assemble.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm targets assemble --settings {params.settings:q} --manifest {input.manifest} "
        "--shards {input.shards} --out-dir {params.out_dir} > {log} 2>&1"
