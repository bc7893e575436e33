# Models: the demo world's local models (tokenizer + tiny BLOOM, tiny MMS-architecture Wav2Vec2 fine-tuned
# with character CTC on the demo training speech, as MMS-1B-all),
# or, at paper scale, hub models fetched once into the Hugging Face cache (compute nodes may be offline).


rule demo_llm:
    output:
        directory(DEMO_LLM_DIR),
    params:
        settings=lambda wc: as_json({
            "demo_build": demo_build_settings(
                "tokenizer_vocab_size", "llm_vocab_pad_to", "llm_embedding_norm", "llm", "llm_pretrain"
            ),
            "prompt": config["models"]["prompt"],
            "st_prompt": config["evaluate"]["st_prompt"],
            "llm_fraction": config["data"].get("demo", {}).get("llm_train_fraction"),
            "composed": config["data"].get("demo", {}).get("composed"),
            "composed_glue": config["data"].get("demo", {}).get("composed_glue"),
            "option_prefix": config["evaluate"]["option_prefix"],
            "seed": config["seed"],
        }),
    log:
        "logs/models/demo_llm.log",
    benchmark:
        "logs/benchmark/demo_llm.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm models demo-llm --settings {params.settings:q} --out-dir {output} --threads {threads} > {log} 2>&1"


rule demo_speech_encoder:
    input:
        train="results/data/train.jsonl",
        dev="results/data/dev.jsonl",
    output:
        directory(DEMO_ENCODER_DIR),
    params:
        settings=as_json({
            "demo_build": demo_build_settings("speech_encoder"),
            "sampling_rate": config["data"]["sampling_rate"],
            "seed": config["seed"],
        }),
    log:
        "logs/models/demo_speech_encoder.log",
    benchmark:
        "logs/benchmark/demo_speech_encoder.tsv"
    threads: 2
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm models demo-speech-encoder --settings {params.settings:q} --out-dir {output} "
        "--train-manifest {input.train} --dev-manifest {input.dev} --threads {threads} > {log} 2>&1"


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
    threads: 1
    resources:
        mem_mb=2000,
        runtime=240,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm models fetch --name {params.name} --revision {params.revision} > {log} 2>&1"
