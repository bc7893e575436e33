# Training: the untrained starting point, CTC pretraining onto the LLM's token embeddings, and CE training
# into the frozen LLM on T, MI and TMI targets (initialised from the CTC model without its CTC head).


rule init_model:
    input:
        unpack(model_inputs),
        language_ids="results/data/language_ids.json",
    output:
        directory("results/models/ctc_init"),
    params:
        settings=lambda wc: train_settings("ctc"),
    log:
        "logs/train/init.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm train init --settings {params.settings:q} --language-ids {input.language_ids} "
        "--out-dir {output} > {log} 2>&1"


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
        run_name=f"{config['experiment']}-ctc",
    log:
        "logs/train/ctc.log",
    threads: config["resources"]["cpu_threads"]
    resources:
        gpu=config["resources"]["gpu"],
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm train ctc --settings {params.settings:q} --train {input.train} --dev {input.dev} "
        "--language-ids {input.language_ids} --out-dir {output.model} --log-dir {params.log_dir} "
        "--run-name {params.run_name} --threads {threads} > {log} 2>&1"


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
        run_name=lambda wc: f"{config['experiment']}-ce-{wc.variant}",
    log:
        "logs/train/ce_{variant}.log",
    threads: config["resources"]["cpu_threads"]
    resources:
        gpu=config["resources"]["gpu"],
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm train ce --settings {params.settings:q} --train {input.train} --dev {input.dev} "
        "--language-ids {input.language_ids} --init-from {input.init} --out-dir {output.model} "
        "--log-dir {params.log_dir} --run-name {params.run_name} --threads {threads} > {log} 2>&1"
