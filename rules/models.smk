# Models: the demo world's local models (tokenizer + tiny BLOOM, tiny MMS-architecture Wav2Vec2 fine-tuned
# with character CTC on the demo training speech, as MMS-1B-all),
# or, at paper scale, hub models fetched once into the Hugging Face cache (compute nodes may be offline).


rule demo_llm:
    output:
        directory(DEMO_LLM_DIR),
    params:
        settings=lambda wc: demo_llm_settings(),
    log:
        "logs/models/demo_llm.log",
    benchmark:
        "logs/benchmark/demo_llm.tsv"
    threads: rule_resources("demo_llm")["cpu_threads"]
    resources:
        **job_resources("demo_llm"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm models demo-llm --settings {params.settings:q} --out-dir {output} --threads {threads} --record {log} > {log} 2>&1"


rule demo_speech_encoder:
    input:
        train="results/data/train.jsonl",
        dev="results/data/dev.jsonl",
    output:
        directory(DEMO_ENCODER_DIR),
    params:
        settings=demo_speech_encoder_settings(),
    log:
        "logs/models/demo_speech_encoder.log",
    benchmark:
        "logs/benchmark/demo_speech_encoder.tsv"
    threads: rule_resources("demo_speech_encoder")["cpu_threads"]
    resources:
        **job_resources("demo_speech_encoder"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm models demo-speech-encoder --settings {params.settings:q} --out-dir {output} "
        "--train-manifest {input.train} --dev-manifest {input.dev} --threads {threads} --record {log} > {log} 2>&1"


rule fetch_model:
    output:
        touch("resources/models/{part}.fetched"),
    params:
        name=lambda wc: config["models"][wc.part]["name_or_path"],
        revision=lambda wc: config["models"][wc.part]["revision"],
    wildcard_constraints:
        part="llm|speech_encoder",
    log:
        "logs/models/fetch_{part}.log",
    benchmark:
        "logs/benchmark/fetch_model/{part}.tsv"
    threads: rule_resources("fetch_model")["cpu_threads"]
    resources:
        **job_resources("fetch_model"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm models fetch --name {params.name} --revision {params.revision} --record {log} > {log} 2>&1"


# The published models (config `released`): the ESPnet model-zoo repositories are fetched once into the Hugging
# Face cache (resumable; on the submit host when compute nodes are offline) and imported as model directories
# (speechllm import espnet), which `evaluate` then scores as system released_<name>.
rule fetch_released:
    output:
        touch("resources/released/{released}.fetched"),
    params:
        repo=lambda wc: released_entry(wc)["repo"],
        revision=lambda wc: released_entry(wc).get("revision", "main"),
    log:
        "logs/models/fetch_released_{released}.log",
    benchmark:
        "logs/benchmark/fetch_released/{released}.tsv"
    threads: rule_resources("fetch_released")["cpu_threads"]
    resources:
        **job_resources("fetch_released"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm models fetch --name {params.repo} --revision {params.revision} --record {log} > {log} 2>&1"


rule import_released:
    input:
        unpack(released_repo_inputs),
    output:
        directory("results/models/released_{released}"),
    params:
        repo=lambda wc: released_entry(wc)["repo"],
        revision=lambda wc: released_entry(wc).get("revision", "main"),
        speech_encoder=config["released"]["speech_encoder"]["name_or_path"],
        speech_encoder_revision=config["released"]["speech_encoder"]["revision"],
        llm_dtype=config["released"]["llm"]["dtype"],
        int8="--load-in-8bit" if config["released"]["llm"]["load_in_8bit"] else "",
    log:
        "logs/models/import_released_{released}.log",
    benchmark:
        "logs/benchmark/import_released/{released}.tsv"
    threads: rule_resources("import_released")["cpu_threads"]
    resources:
        **job_resources("import_released"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm import espnet --repo {params.repo} --revision {params.revision} --out-dir {output} "
        "--speech-encoder {params.speech_encoder} --speech-encoder-revision {params.speech_encoder_revision} "
        "--llm-dtype {params.llm_dtype} {params.int8} --threads {threads} --record {log} > {log} 2>&1"


rule import_released_kang_roy:
    input:
        unpack(model_inputs),
        checkpoint=config["released"]["kang_roy"]["checkpoint"] or [],
    output:
        directory("results/models/released_kang_roy"),
    params:
        settings=lambda wc: as_json({"models": {k: config["models"][k] for k in
                                                ("llm", "speech_encoder", "pooling", "chat", "prompt")}}),
    log:
        "logs/models/import_released_kang_roy.log",
    benchmark:
        "logs/benchmark/import_released_kang_roy.tsv"
    threads: rule_resources("import_released")["cpu_threads"]
    resources:
        **job_resources("import_released"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm import kang-roy --checkpoint {input.checkpoint} --settings {params.settings:q} "
        "--out-dir {output} --threads {threads} --record {log} > {log} 2>&1"
