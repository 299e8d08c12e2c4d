"""The HAET 2021 challenge as code: rules, submissions, the mini-ImageNet-10 loader."""
