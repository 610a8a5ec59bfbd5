from aerl_fast.train.cli import main

main()
