# Result tables: `snakemake results/tables/<name>.md` regenerates one table and only what it needs.


rule table:
    input:
        table_scores,
    output:
        md="results/tables/{name}.md",
        csv=report("results/tables/{name}.csv", caption="../workflow/report/table.rst", category="Result tables"),
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
