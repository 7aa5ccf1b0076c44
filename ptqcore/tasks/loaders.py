"""`custom_dataset` hooks of the offline task YAMLs in this folder (lm-eval imports this file by
path through `!function loaders.<task>`); each returns the task's items as a DatasetDict with
one `test` split, built into the cache on first use (see `ptqcore.tasks.build`)."""

from ptqcore.tasks.build import load_dataset_dict


def winogrande_bb(**_metadata):
    return load_dataset_dict("winogrande_bb")


def siqa_bb(**_metadata):
    return load_dataset_dict("siqa_bb")


def sciq_bb(**_metadata):
    return load_dataset_dict("sciq_bb")


def mmlu_dev(**_metadata):
    return load_dataset_dict("mmlu_dev")


def lastword_wiki(**_metadata):
    return load_dataset_dict("lastword_wiki")
