# Training: the untrained starting point, CTC pretraining onto the LLM's token embeddings, and CE training
# into the frozen LLM on T, MI and TMI targets (initialised from the CTC model without its CTC head); for
# `system: kang_roy`, the KD training of the speech encoder on the frozen chat LLM's responses.
# Each training job checkpoints into results/train/<model>/checkpoints (not an output: it survives a failed or
# killed job) and a rerun with the same settings and inputs resumes from the latest checkpoint.


rule init_model:
    input:
        unpack(model_inputs),
        language_ids="results/data/language_ids.json",
    output:
        directory("results/models/ctc_init"),
    params:
        settings=lambda wc: init_settings("bloomzmms"),
    log:
        "logs/train/init.log",
    benchmark:
        "logs/benchmark/init_model.tsv"
    threads: rule_resources("init_model")["cpu_threads"]
    resources:
        **job_resources("init_model"),  # loads the whole LLM (its embeddings become the CTC head)
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm train init --settings {params.settings:q} --language-ids {input.language_ids} "
        "--out-dir {output} --threads {threads} --record {log} > {log} 2>&1"


rule init_kang_roy:
    input:
        unpack(model_inputs),
    output:
        directory(KANG_ROY_INIT_DIR),
    params:
        settings=lambda wc: init_settings("kang_roy"),
    log:
        "logs/train/init_kang_roy.log",
    benchmark:
        "logs/benchmark/init_kang_roy.tsv"
    threads: rule_resources("init_model")["cpu_threads"]
    resources:
        **job_resources("init_model"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm train init --settings {params.settings:q} --out-dir {output} --threads {threads} --record {log} > {log} 2>&1"


rule train_ctc:
    input:
        unpack(model_inputs),
        train="results/data/train.jsonl",
        dev="results/data/dev.jsonl",
        language_ids="results/data/language_ids.json",
    output:
        model=directory("results/models/ctc"),
        metrics=report("results/train/ctc/metrics.csv", caption="../workflow/report/training.rst", category="Training"),
        summary="results/train/ctc/summary.json",
    params:
        settings=lambda wc: train_settings("ctc"),
        log_dir=lambda wc, output: parent_dir(output.metrics, 1),
        checkpoint_dir=lambda wc, output: os.path.join(parent_dir(output.metrics, 1), "checkpoints"),
        run_name=f"{config['experiment']}-ctc",
        job_type="train_ctc",  # W&B job type = the rule
        launcher=launcher,
    log:
        "logs/train/ctc.log",
    benchmark:
        "logs/benchmark/train_ctc.tsv"
    threads: rule_resources("train_ctc")["cpu_threads"]
    resources:
        **job_resources("train_ctc"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "{params.launcher} speechllm train ctc --settings {params.settings:q} --train {input.train} --dev {input.dev} "
        "--language-ids {input.language_ids} --out-dir {output.model} --log-dir {params.log_dir} "
        "--checkpoint-dir {params.checkpoint_dir} --run-name {params.run_name} --job-type {params.job_type} "
        "--threads {threads} --record {log} > {log} 2>&1"


rule train_ce:
    input:
        unpack(model_inputs),
        train="results/data/train_{variant}.jsonl",
        dev="results/data/dev.jsonl",
        language_ids="results/data/language_ids.json",
        init="results/models/ctc",
    output:
        model=directory("results/models/{variant}"),
        metrics=report("results/train/{variant}/metrics.csv", caption="../workflow/report/training.rst", category="Training"),
        summary="results/train/{variant}/summary.json",
    params:
        settings=lambda wc: train_settings("ce"),
        log_dir=lambda wc, output: parent_dir(output.metrics, 1),
        checkpoint_dir=lambda wc, output: os.path.join(parent_dir(output.metrics, 1), "checkpoints"),
        run_name=lambda wc: f"{config['experiment']}-ce-{wc.variant}",
        job_type="train_ce",  # W&B job type = the rule
        launcher=launcher,
    log:
        "logs/train/ce_{variant}.log",
    benchmark:
        "logs/benchmark/train_ce/{variant}.tsv"
    threads: rule_resources("train_ce")["cpu_threads"]
    resources:
        **job_resources("train_ce"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "{params.launcher} speechllm train ce --settings {params.settings:q} --train {input.train} --dev {input.dev} "
        "--language-ids {input.language_ids} --init-from {input.init} --out-dir {output.model} "
        "--log-dir {params.log_dir} --checkpoint-dir {params.checkpoint_dir} --run-name {params.run_name} "
        "--job-type {params.job_type} --threads {threads} --record {log} > {log} 2>&1"


rule train_kd:
    input:
        unpack(model_inputs),
        train=lambda wc: kd_manifest("train"),
        dev=lambda wc: kd_manifest("dev"),
    output:
        model=directory(KANG_ROY_MODEL_DIR),
        metrics=report("results/train/kang_roy/metrics.csv", caption="../workflow/report/training.rst",
                       category="Training"),
        summary="results/train/kang_roy/summary.json",
    params:
        settings=lambda wc: train_settings("kd"),
        log_dir=lambda wc, output: parent_dir(output.metrics, 1),
        checkpoint_dir=lambda wc, output: os.path.join(parent_dir(output.metrics, 1), "checkpoints"),
        run_name=f"{config['experiment']}-kd",
        job_type="train_kd",  # W&B job type = the rule
        launcher=launcher,
    log:
        "logs/train/kd.log",
    benchmark:
        "logs/benchmark/train_kd.tsv"
    threads: rule_resources("train_kd")["cpu_threads"]
    resources:
        **job_resources("train_kd"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "{params.launcher} speechllm train kd --settings {params.settings:q} --train {input.train} --dev {input.dev} "
        "--out-dir {output.model} --log-dir {params.log_dir} --checkpoint-dir {params.checkpoint_dir} "
        "--run-name {params.run_name} --job-type {params.job_type} --threads {threads} --record {log} > {log} 2>&1"
