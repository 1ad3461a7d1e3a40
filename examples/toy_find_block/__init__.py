"""The paper's toy task (MTA, arXiv 2504.00927, section 3): find the block that contains all query letters."""
