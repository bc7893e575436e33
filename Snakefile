# speechllm: teach multilingual LLMs to understand speech (BLOOMZMMS; speech-prompted summarization).
# Thin entry point: load and validate config, include one rule file per stage, define the final targets.
# Default config = the embedded offline demo; paper scale: --configfile config/experiments/bloomzmms.yaml

import os

from snakemake.utils import min_version

min_version("9.0")


# The embedded default, found next to this Snakefile so `snakemake -d <elsewhere>` works too.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


# envs/speechllm.post-deploy.sh installs the package from here into a `--sdm conda` environment.
os.environ.update(SPEECHLLM_REPO=workflow.basedir)


# Front page of `snakemake --report results/report.html`.
report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/targets.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


# Paths named in the config are checked before the first job of a run (a dry run lists the jobs without them).
onstart:
    check_config_paths()


rule all:
    input:
        all_tables(),
        report_plots(),
        wandb_results(),
        rules.resource_usage.output,
    default_target: True
