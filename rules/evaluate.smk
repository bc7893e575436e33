# Evaluation: each system on each benchmark → per-utterance outputs (Parquet) + a score file.


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
    log:
        "logs/eval/{benchmark}/{system}.log",
    threads: config["resources"]["cpu_threads"]
    resources:
        gpu=config["resources"]["gpu"],
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm evaluate {wildcards.benchmark} --settings {params.settings:q} --model {input.model} "
        "--name {wildcards.system} --decoder {params.decoder} --manifests {input.manifests} "
        "--hyps {output.hyps} --scores {output.scores} --threads {threads} > {log} 2>&1"
