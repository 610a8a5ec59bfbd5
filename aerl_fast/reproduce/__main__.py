from aerl_fast.reproduce.cli import main

main()
