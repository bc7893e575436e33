# Results: tables (`snakemake results/tables/<name>.md` regenerates one table and only what it needs), the report
# figures (`snakemake --report results/report.html`), the W&B results run of each system, and `wandb sync`.


rule table:
    input:
        table_scores,
    output:
        md="results/tables/{name}.md",
        csv=report("results/tables/{name}.csv", caption="../workflow/report/table.rst", category="Results",
                   subcategory="{name}", labels={"benchmark": "{name}", "figure": "table"}),
        tex="results/tables/{name}.tex",
    params:
        systems=lambda wc: BENCHMARK_SYSTEMS[wc.name],
        stem=lambda wc, output: os.path.splitext(output.md)[0],
    log:
        "logs/report/table_{name}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report table --name {wildcards.name} --scores {input} --models {params.systems} "
        "--out-stem {params.stem} > {log} 2>&1"


rule benchmark_plot:
    input:
        table_scores,
    output:
        report("results/plots/{name}.png", caption="../workflow/report/benchmark_plot.rst", category="Results",
               subcategory="{name}", labels={"benchmark": "{name}", "figure": "bars"}),
    params:
        systems=lambda wc: BENCHMARK_SYSTEMS[wc.name],
    log:
        "logs/report/plot_{name}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report plots bars --name {wildcards.name} --scores {input} --models {params.systems} "
        "--out {output} > {log} 2>&1"


rule learning_curves:
    input:
        metrics="results/train/{model}/metrics.csv",
    output:
        report("results/plots/train/{model}.png", caption="../workflow/report/learning_curves.rst",
               category="Training", subcategory="{model}", labels={"model": "{model}", "figure": "curves"}),
    wildcard_constraints:
        model="|".join(TRAINED_MODELS),
    log:
        "logs/report/learning_curves_{model}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report plots curves --metrics {input.metrics} --title {wildcards.model} --out {output} "
        "> {log} 2>&1"


rule wandb_results:
    input:
        unpack(system_train_summary),
        scores=system_scores,
    output:
        "results/wandb/{system}.json",
    params:
        settings=lambda wc: wandb_results_settings(wc.system),
        log_dir=lambda wc, output: os.path.splitext(output[0])[0],
        train_summary=lambda wc, input: f"--train-summary {input.train_summary}" if "train_summary" in input.keys()
        else "",
    log:
        "logs/report/wandb_{system}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report wandb --settings {params.settings:q} --system {wildcards.system} --scores {input.scores} "
        "{params.train_summary} --log-dir {params.log_dir} --out {output} > {log} 2>&1"


# Upload offline W&B runs from the login node (`snakemake wandb_sync`; compute nodes may have no internet).
rule wandb_sync:
    input:
        wandb_sync_inputs,
    output:
        "results/wandb/sync.json",
    params:
        roots=["results", "logs"],
    log:
        "logs/report/wandb_sync.log",
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report wandb-sync --roots {params.roots} --out {output} > {log} 2>&1"
