# Data: the demo world spoken with TTS, or at paper scale FLEURS (hub parquet conversion) + the Common Voice 12
# subsample, SpeechGLUE / SpeechXNLI (released audio or TTS), LibriSpeech and spoken articles (summarization)
# → checked, normalised, duration-filtered, speed-perturbed manifests + language-ID labels.


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
    benchmark:
        "logs/benchmark/demo_data.tsv"
    threads: rule_resources("demo_data")["cpu_threads"]
    resources:
        **job_resources("demo_data"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data demo --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads} --record {log} > {log} 2>&1"


rule fleurs_data:
    output:
        manifests=expand("resources/fleurs/{split}.jsonl", split=["train", "dev", "test"]),
        report="resources/fleurs/report.json",
    params:
        settings=lambda wc: source_settings("languages", "fleurs"),
        out_dir=lambda wc, output: parent_dir(output.manifests[0], 1),
    log:
        "logs/data/fleurs_data.log",
    benchmark:
        "logs/benchmark/fleurs_data.tsv"
    threads: rule_resources("fleurs_data")["cpu_threads"]
    resources:
        **job_resources("fleurs_data"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data fleurs --settings {params.settings:q} --out-dir {params.out_dir} --record {log} > {log} 2>&1"


rule prepare_split:
    input:
        raw_manifest,
    output:
        manifest="results/data/{split}.jsonl",
        report=report("results/data/{split}.report.json", caption="../workflow/report/data.rst", category="Data"),
    params:
        settings=lambda wc: prepare_settings(wc.split),
    log:
        "logs/data/prepare_{split}.log",
    benchmark:
        "logs/benchmark/prepare_split/{split}.tsv"
    threads: rule_resources("prepare_split")["cpu_threads"]
    resources:
        **job_resources("prepare_split"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data prepare --settings {params.settings:q} --manifest {input} --out {output.manifest} "
        "--report {output.report} --record {log} > {log} 2>&1"


rule language_ids:
    input:
        # the names of both sets, as the reference's gen_lang_id.py (train_t_sp and dev_fleurs)
        "results/data/train.jsonl",
        "results/data/dev.jsonl",
    output:
        "results/data/language_ids.json",
    log:
        "logs/data/language_ids.log",
    benchmark:
        "logs/benchmark/language_ids.tsv"
    threads: rule_resources("language_ids")["cpu_threads"]
    resources:
        **job_resources("language_ids"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data language-ids --manifests {input} --out {output} --record {log} > {log} 2>&1"


rule speechglue_data:
    output:
        expand("resources/speechglue/{task}.jsonl", task=config["data"]["speechglue"]["tasks"]),
    params:
        settings=lambda wc: source_settings("speechglue"),
        out_dir=lambda wc, output: parent_dir(output[0], 2),
    log:
        "logs/data/speechglue_data.log",
    benchmark:
        "logs/benchmark/speechglue_data.tsv"
    threads: rule_resources("speechglue_data")["cpu_threads"]
    resources:
        **job_resources("speechglue_data"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data speechglue --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads} --record {log} > {log} 2>&1"


rule speechxnli_data:
    input:
        unpack(speechxnli_inputs),
    output:
        "resources/speechxnli/test.jsonl",
    params:
        settings=lambda wc: source_settings("speechxnli"),
        out_dir=lambda wc, output: parent_dir(output[0], 2),
        archive=speechxnli_archive_arg,
    log:
        "logs/data/speechxnli_data.log",
    benchmark:
        "logs/benchmark/speechxnli_data.tsv"
    threads: rule_resources("speechxnli_data")["cpu_threads"]
    resources:
        **job_resources("speechxnli_data"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data speechxnli --settings {params.settings:q} --out-dir {params.out_dir} {params.archive} "
        "--threads {threads} --record {log} > {log} 2>&1"


rule zenodo_file:
    output:
        "resources/zenodo/{name}",
    wildcard_constraints:
        name=r"[A-Za-z0-9_.-]+",
    params:
        url=lambda wc: zenodo_url(wc.name),
        timeout=config["resources"]["download_timeout_seconds"],
    log:
        "logs/data/zenodo_{name}.log",
    benchmark:
        "logs/benchmark/zenodo_file/{name}.tsv"
    threads: rule_resources("zenodo_file")["cpu_threads"]
    resources:
        **job_resources("zenodo_file"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data fetch --url {params.url:q} --out {output} --timeout {params.timeout} --record {log} > {log} 2>&1"


rule common_voice_data:
    input:
        unpack(common_voice_inputs),
    output:
        manifest="resources/common_voice/train.jsonl",
        report="resources/common_voice/report.json",
    params:
        settings=lambda wc: source_settings("common_voice"),
        out_dir=lambda wc, output: parent_dir(output.manifest, 1),
    log:
        "logs/data/common_voice_data.log",
    benchmark:
        "logs/benchmark/common_voice_data.tsv"
    threads: rule_resources("common_voice_data")["cpu_threads"]
    resources:
        **job_resources("common_voice_data"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data common-voice --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads} "
        "--record {log} > {log} 2>&1"


rule hub_train_manifest:
    input:
        fleurs="resources/fleurs/train.jsonl",
        common_voice="resources/common_voice/train.jsonl",
    output:
        "resources/hub/train.jsonl",
    log:
        "logs/data/hub_train_manifest.log",
    benchmark:
        "logs/benchmark/hub_train_manifest.tsv"
    threads: rule_resources("hub_train_manifest")["cpu_threads"]
    resources:
        **job_resources("hub_train_manifest"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data combine --manifests {input.fleurs} {input.common_voice} --out {output} --record {log} > {log} 2>&1"


rule librispeech_data:
    output:
        manifests=expand("resources/librispeech/{split}.jsonl", split=["train", "dev", "test"]),
        report="resources/librispeech/report.json",
    params:
        settings=lambda wc: source_settings("librispeech"),
        out_dir=lambda wc, output: parent_dir(output.report, 1),
    log:
        "logs/data/librispeech_data.log",
    benchmark:
        "logs/benchmark/librispeech_data.tsv"
    threads: rule_resources("librispeech_data")["cpu_threads"]
    resources:
        **job_resources("librispeech_data"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data librispeech --settings {params.settings:q} --out-dir {params.out_dir} --record {log} > {log} 2>&1"


rule articles_data:
    output:
        "resources/articles/test.jsonl",
    params:
        settings=lambda wc: source_settings("articles"),
        out_dir=lambda wc, output: parent_dir(output[0], 2),
    log:
        "logs/data/articles_data.log",
    benchmark:
        "logs/benchmark/articles_data.tsv"
    threads: rule_resources("articles_data")["cpu_threads"]
    resources:
        **job_resources("articles_data"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm data articles --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads} "
        "--record {log} > {log} 2>&1"
