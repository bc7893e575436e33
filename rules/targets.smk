# Synthetic multi-instruction targets: the frozen LLM continues prefix + transcript + postfix (scattered
# over shards, one job each), then T / MI / TMI training manifests are assembled. With
# targets.source: released they are imported from the reference's released token ids instead. Also the
# Kang & Roy response targets: the chat LLM's greedy response to each transcript of a manifest
# (targets.responses.manifests), scattered over shards and gathered.


if FETCHED_TEMPLATES:

    rule fetch_templates:
        output:
            FETCHED_TEMPLATES,
        params:
            url=config["targets"]["templates_download"]["url"],
            sha256=config["targets"]["templates_download"]["sha256"],
            timeout=config["resources"]["download_timeout_seconds"],
        log:
            "logs/targets/fetch_templates.log",
        benchmark:
            "logs/benchmark/fetch_templates.tsv"
        threads: rule_resources("fetch_templates")["cpu_threads"]
        resources:
            **job_resources("fetch_templates"),
        conda:
            "../envs/speechllm.yaml"
        shell:
            "speechllm targets fetch-templates --url {params.url:q} --sha256 {params.sha256} --out {output} "
            "--timeout {params.timeout} --record {log} > {log} 2>&1"


rule generate_targets:
    input:
        unpack(model_inputs),
        unpack(template_inputs),
        manifest="results/data/train.jsonl",
    output:
        "results/targets/shard{shard}.jsonl",
    params:
        settings=as_json({
            **{k: config["targets"][k] for k in ("templates", "templates_per_occurrence", "batch_size",
                                                 "max_new_tokens", "num_beams", "clean_up_spaces", "backend",
                                                 "vllm")},
            "llm": config["models"]["llm"],
            "prompt": config["models"]["prompt"],
            "seed": config["seed"],
        }),
        num_shards=config["targets"]["shards"],
    log:
        "logs/targets/generate_shard{shard}.log",
    benchmark:
        "logs/benchmark/generate_targets/{shard}.tsv"
    threads: rule_resources("generate_targets")["cpu_threads"]
    resources:
        **job_resources("generate_targets"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "exec speechllm targets generate --settings {params.settings:q} --manifest {input.manifest} "
        "--shard {wildcards.shard} --num-shards {params.num_shards} --out {output} --threads {threads} "
        "--record {log} > {log} 2>&1"


if config["targets"]["source"] == "released":

    rule fetch_released_targets:
        output:
            RELEASED_TARGETS_ARCHIVE,
        params:
            url=config["targets"]["released"]["url"],
            # No published checksum for the tar: then the download logs its hash instead of checking it.
            sha256_arg=optional_arg("--sha256", config["targets"]["released"]["sha256"]),
            timeout=config["resources"]["download_timeout_seconds"],
        log:
            "logs/targets/fetch_released.log",
        benchmark:
            "logs/benchmark/fetch_released_targets.tsv"
        threads: rule_resources("fetch_released_targets")["cpu_threads"]
        resources:
            **job_resources("fetch_released_targets"),
        conda:
            "../envs/speechllm.yaml"
        shell:
            "speechllm targets fetch-released --url {params.url:q} {params.sha256_arg} --out {output} "
            "--timeout {params.timeout} --record {log} > {log} 2>&1"

    rule import_released_targets:
        input:
            llm=llm_input,
            manifest="results/data/train.jsonl",
            archive=RELEASED_TARGETS_ARCHIVE,
        output:
            expand("results/data/train_{variant}.jsonl", variant=CE_VARIANTS),
        params:
            settings=as_json({
                "llm": config["models"]["llm"],
                "prompt": config["models"]["prompt"],
                "mi_reading": config["targets"]["mi_reading"],
                "templates_per_occurrence": config["targets"]["templates_per_occurrence"],
                "on_unmatched": config["targets"]["released"]["on_unmatched"],
            }),
            out_dir=lambda wc, output: parent_dir(output[0], 1),
        log:
            "logs/targets/import_released.log",
        benchmark:
            "logs/benchmark/import_released_targets.tsv"
        threads: rule_resources("import_released_targets")["cpu_threads"]
        resources:
            **job_resources("import_released_targets"),
        conda:
            "../envs/speechllm.yaml"
        shell:
            "speechllm targets import-released --settings {params.settings:q} --manifest {input.manifest} "
            "--archive {input.archive} --out-dir {params.out_dir} --record {log} > {log} 2>&1"

else:

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
                "drop_blank_outputs": config["targets"]["drop_blank_outputs"],
            }),
            out_dir=lambda wc, output: parent_dir(output[0], 1),
        log:
            "logs/targets/assemble.log",
        benchmark:
            "logs/benchmark/assemble_targets.tsv"
        threads: rule_resources("assemble_targets")["cpu_threads"]
        resources:
            **job_resources("assemble_targets"),
        conda:
            "../envs/speechllm.yaml"
        shell:
            "speechllm targets assemble --settings {params.settings:q} --manifest {input.manifest} "
            "--shards {input.shards} --out-dir {params.out_dir} --record {log} > {log} 2>&1"


rule generate_responses:
    input:
        llm=llm_input,
        manifest=response_manifest,
    output:
        "results/responses/{response_set}/shard{shard}.jsonl",
    params:
        # a lambda: the prompt template's {text} is not a wildcard
        settings=lambda wc: as_json({
            "llm": config["models"]["llm"],
            "backend": config["targets"]["backend"],
            "vllm": config["targets"]["vllm"],
            "seed": config["seed"],
            "responses": {k: v for k, v in config["targets"]["responses"].items()
                          if k not in ("manifests", "shards")},
        }),
        num_shards=config["targets"]["responses"]["shards"],
    log:
        "logs/targets/responses_{response_set}_shard{shard}.log",
    benchmark:
        "logs/benchmark/generate_responses/{response_set}/{shard}.tsv"
    threads: rule_resources("generate_responses")["cpu_threads"]
    resources:
        **job_resources("generate_responses"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "exec speechllm targets responses --settings {params.settings:q} --manifest {input.manifest} "
        "--shard {wildcards.shard} --num-shards {params.num_shards} --out {output} --threads {threads} "
        "--record {log} > {log} 2>&1"


rule gather_responses:
    input:
        response_shards,
    output:
        "results/responses/{response_set}.jsonl",
    log:
        "logs/targets/gather_responses_{response_set}.log",
    benchmark:
        "logs/benchmark/gather_responses/{response_set}.tsv"
    threads: rule_resources("gather_responses")["cpu_threads"]
    resources:
        **job_resources("gather_responses"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm targets gather --shards {input} --out {output} --record {log} > {log} 2>&1"
