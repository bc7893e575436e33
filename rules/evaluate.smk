# Evaluation: each system on each benchmark → per-utterance outputs (Parquet) + a score file; the CoVoST 2
# X→en test manifest from a local release (when evaluate.covost2.release_dir is set).


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
    threads: rule_resources("evaluate")["cpu_threads"]
    resources:
        **job_resources("evaluate"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "{params.launcher} speechllm evaluate {wildcards.benchmark} --settings {params.settings:q} --model {input.model} "
        "--name {wildcards.system} --decoder {params.decoder} --manifests {input.manifests} "
        "--hyps {output.hyps} --scores {output.scores} --threads {threads} > {log} 2>&1"


rule covost2_data:
    output:
        COVOST2_MANIFEST,
    params:
        settings=lambda wc: as_json({"evaluate": {"covost2": config["evaluate"]["covost2"]}}),
    log:
        "logs/eval/covost2_data.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm evaluate covost2-manifest --settings {params.settings:q} --out {output} > {log} 2>&1"
