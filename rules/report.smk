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
    benchmark:
        "logs/benchmark/table/{name}.tsv"
    threads: rule_resources("table")["cpu_threads"]
    resources:
        **job_resources("table"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report table --name {wildcards.name} --scores {input} --models {params.systems} "
        "--out-stem {params.stem} --record {log} > {log} 2>&1"


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
    benchmark:
        "logs/benchmark/benchmark_plot/{name}.tsv"
    threads: rule_resources("benchmark_plot")["cpu_threads"]
    resources:
        **job_resources("benchmark_plot"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report plots bars --name {wildcards.name} --scores {input} --models {params.systems} "
        "--out {output} --record {log} > {log} 2>&1"


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
    benchmark:
        "logs/benchmark/learning_curves/{model}.tsv"
    threads: rule_resources("learning_curves")["cpu_threads"]
    resources:
        **job_resources("learning_curves"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report plots curves --metrics {input.metrics} --title {wildcards.model} --out {output} "
        "--record {log} > {log} 2>&1"


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
    benchmark:
        "logs/benchmark/wandb_results/{system}.tsv"
    threads: rule_resources("wandb_results")["cpu_threads"]
    resources:
        **job_resources("wandb_results"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report wandb --settings {params.settings:q} --system {wildcards.system} --scores {input.scores} "
        "{params.train_summary} --log-dir {params.log_dir} --out {output} --record {log} > {log} 2>&1"


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
    benchmark:
        "logs/benchmark/wandb_sync.tsv"
    localrule: True
    threads: rule_resources("wandb_sync")["cpu_threads"]
    resources:
        **job_resources("wandb_sync"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report wandb-sync --roots {params.roots} --out {output} --record {log} > {log} 2>&1"


# The jobs' measured wall time, memory and CPU (every rule's `benchmark:` file) against what they asked for; runs
# after everything else of the run, and reads whatever benchmark files exist then (docs: sizing jobs).
rule resource_usage:
    input:
        all_tables(),
        report_plots(),
        wandb_results(),
    output:
        summary=report("results/resources/usage.csv", caption="../workflow/report/resources.rst", category="Resources",
                       labels={"figure": "table per rule"}),
        jobs=report("results/resources/usage.jobs.csv", caption="../workflow/report/resources.rst",
                    category="Resources", labels={"figure": "table per job"}),
        md="results/resources/usage.md",
        plot=report("results/plots/resources.png", caption="../workflow/report/resources.rst", category="Resources",
                    labels={"figure": "bars"}),
    params:
        requests=lambda wc: as_json(rule_requests()),
        root="logs/benchmark",
        stem=lambda wc, output: os.path.splitext(output.summary)[0],
    log:
        "logs/report/resource_usage.log",
    benchmark:
        "logs/benchmark/resource_usage.tsv"
    threads: rule_resources("resource_usage")["cpu_threads"]
    resources:
        **job_resources("resource_usage"),
    conda:
        "../envs/speechllm.yaml"
    shell:
        "speechllm report resources --root {params.root} --requests {params.requests:q} --out-stem {params.stem} "
        "--plot {output.plot} --record {log} > {log} 2>&1"
