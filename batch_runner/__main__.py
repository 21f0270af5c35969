from batch_runner.cli import main

main()
