SELECT create_distributed_table('d.users', 'id');
SELECT create_distributed_table('d.orders', 'user_id', colocate_with => 'd.users');
SELECT create_distributed_table('d.items', 'user_id', colocate_with => 'd.users');
SELECT create_distributed_table('d.events', 'id', colocate_with => 'none');
SELECT create_reference_table('d.regions');
SELECT create_distributed_table('d."MixedCase"', 'Id');
SELECT create_distributed_table('d2.accounts', 'id');
