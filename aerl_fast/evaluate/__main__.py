from aerl_fast.evaluate.cli import main

main()
