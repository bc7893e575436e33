# Data: the demo world spoken with TTS (or FLEURS from the hub at paper scale) → checked, normalised,
# duration-filtered, speed-perturbed manifests + language-ID labels.


rule demo_data:
    output:
        manifests=expand("resources/demo/fleurs/{split}.jsonl", split=["train", "dev", "test"]),
        speechglue=expand("resources/demo/speechglue/{task}.jsonl", task=config["data"]["speechglue"]["tasks"]),
        speechxnli="resources/demo/speechxnli/test.jsonl",
    params:
        settings=lambda wc: data_settings(),
        out_dir=lambda wc, output: parent_dir(output.manifests[0], 2),
    log:
        "logs/data/demo_data.log",
    threads: 2
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data demo --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"


rule fleurs_data:
    output:
        manifests=expand("resources/fleurs/{split}.jsonl", split=["train", "dev", "test"]),
    params:
        settings=lambda wc: data_settings(),
        out_dir=lambda wc, output: parent_dir(output.manifests[0], 1),
    log:
        "logs/data/fleurs_data.log",
    threads: 4
    resources:
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data fleurs --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"


rule prepare_split:
    input:
        raw_manifest,
    output:
        manifest="results/data/{split}.jsonl",
        report=report("results/data/{split}.report.json", caption="../workflow/report/data.rst", category="Data"),
    params:
        settings=lambda wc: as_json({
            **json.loads(data_settings()),
            "speed_perturb": config["data"]["speed_perturb"] if wc.split == "train" else [1.0],
        }),
    log:
        "logs/data/prepare_{split}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data prepare --settings {params.settings:q} --manifest {input} --out {output.manifest} "
        "--report {output.report} > {log} 2>&1"


rule language_ids:
    input:
        "results/data/train.jsonl",
    output:
        "results/data/language_ids.json",
    log:
        "logs/data/language_ids.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data language-ids --manifest {input} --out {output} > {log} 2>&1"


rule speechglue_data:
    output:
        expand("resources/speechglue/{task}.jsonl", task=config["data"]["speechglue"]["tasks"]),
    params:
        settings=lambda wc: data_settings(),
        out_dir=lambda wc, output: parent_dir(output[0], 2),
    log:
        "logs/data/speechglue_data.log",
    threads: 4
    resources:
        mem_mb=8000,
        runtime=12 * 60,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data speechglue --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"


rule speechxnli_data:
    output:
        "resources/speechxnli/test.jsonl",
    params:
        settings=lambda wc: data_settings(),
        out_dir=lambda wc, output: parent_dir(output[0], 2),
    log:
        "logs/data/speechxnli_data.log",
    threads: 4
    resources:
        mem_mb=8000,
        runtime=12 * 60,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data speechxnli --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"
