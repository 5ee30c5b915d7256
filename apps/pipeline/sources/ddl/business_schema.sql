-- The data-marketplace business schema recoplatform was first built for (MySQL/MariaDB DDL).
-- Items are datasets; users buy API access to them (api_order) and open trial/download tasks
-- (task). Every table carries updated_at, maintained by the application on every write: that
-- column plus the primary key is the extraction cursor (config/sources.yaml).
-- make_demo_data creates these tables; on SQLite it translates this DDL (see demo.py).

CREATE TABLE `user` (
  `id` bigint unsigned NOT NULL AUTO_INCREMENT,
  `username` varchar(64) NOT NULL,
  `company_name` varchar(128) DEFAULT NULL,
  `industry` varchar(64) DEFAULT NULL,
  `province` varchar(32) DEFAULT NULL,
  `city` varchar(32) DEFAULT NULL,
  `created_at` datetime NOT NULL,
  `updated_at` datetime NOT NULL,
  PRIMARY KEY (`id`),
  KEY `idx_user_updated` (`updated_at`, `id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE `dataset` (
  `id` bigint unsigned NOT NULL AUTO_INCREMENT,
  `dataset_name` varchar(255) NOT NULL,
  `description` text,
  -- comma-separated tags
  `tag` varchar(255) DEFAULT NULL,
  `industry` varchar(64) DEFAULT NULL,
  `price` decimal(12,2) NOT NULL DEFAULT '0.00',
  `create_company_name` varchar(128) DEFAULT NULL,
  -- 1 on sale, 0 withdrawn
  `status` tinyint NOT NULL DEFAULT '1',
  `created_at` datetime NOT NULL,
  `updated_at` datetime NOT NULL,
  PRIMARY KEY (`id`),
  KEY `idx_dataset_updated` (`updated_at`, `id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE `task` (
  `id` bigint unsigned NOT NULL AUTO_INCREMENT,
  `user_id` bigint unsigned NOT NULL,
  `dataset_id` bigint unsigned NOT NULL,
  -- trial | download | api_test
  `task_type` varchar(32) NOT NULL,
  -- created | running | done | failed
  `status` varchar(16) NOT NULL,
  `created_at` datetime NOT NULL,
  `updated_at` datetime NOT NULL,
  PRIMARY KEY (`id`),
  KEY `idx_task_updated` (`updated_at`, `id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE `api_order` (
  `id` bigint unsigned NOT NULL AUTO_INCREMENT,
  -- also the Matomo ecommerce order id (ec_id / log_conversion.idorder)
  `order_no` varchar(64) NOT NULL,
  `user_id` bigint unsigned NOT NULL,
  `dataset_id` bigint unsigned NOT NULL,
  `amount` decimal(12,2) NOT NULL,
  -- pending | paid | refunded
  `status` varchar(16) NOT NULL,
  `created_at` datetime NOT NULL,
  `updated_at` datetime NOT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `uniq_order_no` (`order_no`),
  KEY `idx_order_updated` (`updated_at`, `id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
